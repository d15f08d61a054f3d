"""catalog-upload-exporter: Prometheus metrics for HAQM Catalog API upload status."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("catalog-upload-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
