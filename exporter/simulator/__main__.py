"""`python -m exporter.simulator`: the fake Catalog API, standalone."""

import sys

from exporter.simulator.api import main

sys.exit(main())
