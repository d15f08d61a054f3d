"""/metrics as scrapers see it: valid for promtool, OpenMetrics on request, gzip, no secrets."""

from __future__ import annotations

import gzip
import random
import subprocess
import zlib

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

from exporter.exposition import _crc32
from exporter.server import accepts_gzip
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, require_tool, wait_for

IDS = ["done", "fatal", "new", "odd", "nosuch", 'quote"and\\back', "ünïcode-id"]


async def _busy_exporter(start_simulator: SimulatorFactory, start_exporter: ExporterFactory):
    sim, url = await start_simulator()
    sim.add_upload("done", [("DONE", 0)])
    sim.add_upload("fatal", [(["CANCELLED", "FATAL"], 0)])
    sim.add_upload("new", [("PARTIALLY_DONE", 0)])
    sim.add_upload("odd", [("in progress (50%)", 0)])
    sim.add_upload('quote"and\\back', [("INQUEUE", 0)])
    sim.add_upload("ünïcode-id", [("INPROGRESS", 0)])
    running = await start_exporter(fast_config(url, IDS))

    async def all_polled() -> bool:
        return all(sim.count(ingestion_id=i) >= 1 for i in IDS)

    await wait_for(all_polled)
    return running


async def test_promtool_check_metrics_reports_nothing(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """`promtool check metrics` is silent on real output with every kind of status and id."""
    running = await _busy_exporter(start_simulator, start_exporter)
    _, _, body = await running.get("/metrics")
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


async def test_openmetrics_is_served_when_asked_for(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """An OpenMetrics Accept header gets OpenMetrics, which its strict parser accepts."""
    running = await _busy_exporter(start_simulator, start_exporter)
    status, headers, body = await running.get(
        "/metrics", Accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.rstrip().endswith("# EOF")
    names = {family.name for family in parse_om(text)}
    assert {"catalog_upload_status", "catalog_api_requests", "catalog_uploads"} <= names


async def test_gzip_is_served_when_the_scraper_accepts_it(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Accept-Encoding: gzip gets a gzip body (what Prometheus asks for)."""
    running = await _busy_exporter(start_simulator, start_exporter)
    from aiohttp import ClientSession

    async with (
        ClientSession(auto_decompress=False) as session,
        session.get(running.url + "metrics", headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        raw = await response.read()
    assert b"catalog_upload_status" in gzip.decompress(raw)


async def test_the_gzip_body_is_the_identity_body_compressed(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Precompressed pieces make one gzip stream that decodes to the same exposition."""
    from aiohttp import ClientSession

    running = await _busy_exporter(start_simulator, start_exporter)
    await running.exporter.stop()  # nothing changes between the two scrapes
    bodies = {}
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    for accept in ("OpenMetrics", "text"):
        headers = openmetrics if accept == "OpenMetrics" else {}
        async with ClientSession(auto_decompress=False) as session:
            for encoding in ("gzip", "identity"):
                async with session.get(
                    running.url + "metrics",
                    headers={**headers, "Accept-Encoding": encoding},
                ) as response:
                    raw = await response.read()
                    assert int(response.headers["Content-Length"]) == len(raw)
                    assert response.headers.get("Content-Encoding") == (
                        "gzip" if encoding == "gzip" else None
                    )
                    bodies[accept, encoding] = gzip.decompress(raw) if encoding == "gzip" else raw
        assert _steady(bodies[accept, "gzip"]) == _steady(bodies[accept, "identity"])
    assert bodies["OpenMetrics", "gzip"].endswith(b"# EOF\n")
    assert "ünïcode-id".encode() in bodies["text", "gzip"]


def _steady(body: bytes) -> bytes:
    """The body without the gauges computed from the clock at each scrape, and the process,
    GC and loop-lag series, which move on their own."""
    clocked = (
        b"catalog_exporter_poll_lag_seconds ",
        b"catalog_api_rate_limit_requests_per_second ",
        b"catalog_exporter_event_loop_lag_seconds",
        b"process_",
        b"python_gc_",
    )
    return b"\n".join(line for line in body.split(b"\n") if not line.startswith(clocked))


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("deflate, GZIP;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, identity", False),
        ("identity", False),
        ("", False),
        ("gzip;q=nonsense", False),
        ("gzip; q=0.5; level=1", True),
        ("gzip;level=1;q=0", False),
    ],
)
def test_gzip_is_chosen_only_when_accept_encoding_allows_it(header: str, gzipped: bool) -> None:
    assert accepts_gzip(header) is gzipped


async def test_health_readiness_and_landing_page(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """/healthz and /readyz answer 200 while polling; / links the endpoints."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))
    assert (await running.get("/healthz"))[0] == 200
    assert (await running.get("/readyz"))[0] == 200
    status, headers, body = await running.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for link in (b'href="metrics"', b'href="healthz"', b'href="readyz"'):
        assert link in body


def test_the_gzip_trailer_crc_covers_every_piece_across_runs() -> None:
    """The CRC and size of a body of many pieces (several 1 MiB runs, a piece larger than a
    run, empty pieces) are those of the whole body joined."""
    rng = random.Random(7)
    pieces = [rng.randbytes(rng.choice([0, 1, 700, 40_000])) for _ in range(200)]
    pieces.insert(50, rng.randbytes(3 * 1024 * 1024))
    joined = b"".join(pieces)
    assert _crc32(pieces) == (zlib.crc32(joined), len(joined))
    assert _crc32([]) == (0, 0)
