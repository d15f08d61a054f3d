"""The /metrics body as a scrape gets it, through `UploadExposition`'s serving API only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from exporter.exposition import UploadExposition


def scrape_body(
    exposition: UploadExposition, registry: CollectorRegistry, *, openmetrics: bool = False
) -> bytes:
    """The pieces `chunks` hands the server, joined, once any rebuild the settings call for
    is done (as `UploadExposition.run` does between scrapes, here all at once)."""
    exposition.check_settings()
    while not exposition.rebuild_step():
        pass
    return b"".join(exposition.chunks(registry, openmetrics=openmetrics))


async def gzip_scrape_body(
    exposition: UploadExposition, registry: CollectorRegistry, *, openmetrics: bool = False
) -> bytes:
    """The gzip-encoded body a scrape gets (`gzip_chunks_off_loop`, as the server calls it)."""
    return b"".join(await exposition.gzip_chunks_off_loop(registry, openmetrics=openmetrics))
