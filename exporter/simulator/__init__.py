"""The test doubles: a fake Catalog API (`api`) and the fake S3 bucket behind its report links
(`fakes3`), for the demo, the tests and the benchmarks.

No serving module imports this package (`tests/test_layering.py` says so): only `demo`, which
`cli` loads lazily for `--demo`. `python -m exporter.simulator --port N` serves it standalone
(docs/simulator.md).
"""

from __future__ import annotations

from exporter.simulator.api import (
    API_PATH,
    DEMO_INVALID_IDS,
    SIMULATOR_KEY,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    UPLOAD_PATHS,
    Fault,
    FaultKind,
    RequestRecord,
    SimulatedUpload,
    Simulator,
    Step,
    create_app,
    demo_uploads,
    main,
    random_uploads,
)
from exporter.simulator.fakes3 import (
    DEFAULT_LINK_SECONDS,
    REPORTS_PATH,
    ReportBucket,
    ReportRequest,
)

__all__ = [
    "API_PATH",
    "DEFAULT_LINK_SECONDS",
    "DEMO_INVALID_IDS",
    "REPORTS_PATH",
    "SIMULATOR_KEY",
    "TEST_ACCESS_KEY_ID",
    "TEST_REGION",
    "TEST_SECRET_ACCESS_KEY",
    "UPLOAD_PATHS",
    "Fault",
    "FaultKind",
    "ReportBucket",
    "ReportRequest",
    "RequestRecord",
    "SimulatedUpload",
    "Simulator",
    "Step",
    "create_app",
    "demo_uploads",
    "main",
    "random_uploads",
]
