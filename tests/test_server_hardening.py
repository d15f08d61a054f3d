"""The exporter's own HTTP listeners against clients that misbehave.

One real exporter process (`python -m exporter`, the production wiring of the listeners)
serves 20,000 uploads, so a scrape is megabytes: enough to fill a stalled client's socket
buffers. Its API is a closed port: the listeners, not the polling, are under test here.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, launch_exporter, parse_exposition, value

UPLOADS = 20_000
IDLE_TIMEOUT = 0.5
WRITE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Listeners:
    metrics: tuple[str, int]
    admin: tuple[str, int]
    log: Path

    def url(self, path: str, *, admin: bool = False) -> str:
        host, port = self.admin if admin else self.metrics
        return f"http://{host}:{port}{path}"


def fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, method=method, data=data, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_exchange(address: tuple[str, int], request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet for `timeout` seconds."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    directory = tmp_path_factory.mktemp("hardening")
    metrics_port, admin_port = free_port(), free_port()
    config = {
        "api": {"base_url": f"http://127.0.0.1:{free_port()}", "auth": {"type": "none"}},
        "ingestions": {"ids": [f"upload-{i:06d}" for i in range(UPLOADS)]},
        "server": {
            "host": "127.0.0.1",
            "port": metrics_port,
            "idle_timeout_seconds": IDLE_TIMEOUT,
            "write_timeout_seconds": WRITE_TIMEOUT,
        },
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "reload": {"watch_interval_seconds": 0},
    }
    proc, log = launch_exporter(directory, config)
    found = Listeners(("127.0.0.1", metrics_port), ("127.0.0.1", admin_port), log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                ready = fetch(found.url("/readyz"))[0]
                if ready == 200 and fetch(found.url("/healthz", admin=True))[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "exporter not ready within 30 s"
            time.sleep(0.1)
        yield found
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert "Traceback" not in log.read_text()


def test_an_unknown_path_answers_404(listeners: Listeners) -> None:
    assert fetch(listeners.url("/nothing-here"))[0] == 404
    assert fetch(listeners.url("/metrics/extra"))[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_a_wrong_method_answers_405_naming_the_allowed_ones(
    listeners: Listeners, method: str
) -> None:
    request = urllib.request.Request(listeners.url("/metrics"), method=method, data=b"x")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310
    assert refused.value.code == 405
    assert "GET" in refused.value.headers["Allow"]


def test_head_of_metrics_answers_without_a_body(listeners: Listeners) -> None:
    request = urllib.request.Request(listeners.url("/metrics"), method="HEAD")  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 200
        assert response.read() == b""


def test_an_oversized_header_is_refused_and_the_server_goes_on(listeners: Listeners) -> None:
    huge = b"X-Filler: " + b"a" * 100_000 + b"\r\n"
    answer = raw_exchange(
        listeners.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n"
    )
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert fetch(listeners.url("/healthz"))[0] == 200


def test_an_oversized_request_line_is_refused(listeners: Listeners) -> None:
    answer = raw_exchange(listeners.metrics, b"GET /" + b"m" * 20_000 + b" HTTP/1.1\r\n\r\n")
    assert 400 <= int(answer.split(b" ", 2)[1]) < 500, answer[:200]


def test_an_oversized_admin_body_is_refused_with_413(listeners: Listeners) -> None:
    status, body = fetch(
        listeners.url("/api/v1/ingestions", admin=True), "POST", b"{" + b" " * 200_000 + b"}"
    )
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"


@pytest.mark.parametrize(
    "partial",
    [b"", b"GET /metrics HTTP/1.1\r\nHost: 127.0", b"GET /metrics HTTP/1.1\r\n"],
    ids=["nothing", "half-a-header", "request-line-only"],
)
def test_a_client_that_stalls_before_finishing_its_request_is_closed(
    listeners: Listeners, partial: bytes
) -> None:
    """Idle or half-sent requests are closed after server.idle_timeout_seconds."""
    started = time.monotonic()
    assert raw_exchange(listeners.metrics, partial) == b""
    assert IDLE_TIMEOUT * 0.8 <= time.monotonic() - started < IDLE_TIMEOUT + 3


@pytest.mark.slow
def test_an_admin_body_that_never_arrives_answers_408(listeners: Listeners) -> None:
    """Headers promise 100 bytes, 10 come: 408 after the idle timeout, not a hung handler."""
    started = time.monotonic()
    answer = raw_exchange(
        listeners.admin,
        b"POST /api/v1/ingestions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"ingesti',
        timeout=IDLE_TIMEOUT + 2,
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"408", answer[:300]
    assert json.loads(body)["error"] == "request_timeout"
    assert time.monotonic() - started < IDLE_TIMEOUT + 4


@pytest.mark.slow
def test_a_scrape_client_that_stops_reading_is_dropped_while_others_are_served(
    listeners: Listeners,
) -> None:
    """A stalled scraper is cut off after server.write_timeout_seconds and counted."""
    status, whole = fetch(listeners.url("/metrics"))
    assert status == 200
    assert len(whole) > 10_000_000  # more than loopback socket buffers hold
    dropped_before = value(
        parse_exposition(whole.decode()), "catalog_exporter_scrape_clients_dropped_total"
    )
    assert dropped_before == 0.0

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(listeners.metrics)
    try:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        # Meanwhile other scrapes are answered in full.
        while time.monotonic() - started < WRITE_TIMEOUT * 2:
            status, body = fetch(listeners.url("/metrics"))
            assert status == 200
            assert body.endswith(b"\n")
        received = 0
        stalled.settimeout(10)
        try:
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted: the rest of the body was thrown away
    finally:
        stalled.close()
    assert received < len(whole)  # it never got the whole body
    samples = parse_exposition(fetch(listeners.url("/metrics"))[1].decode())
    assert value(samples, "catalog_exporter_scrape_clients_dropped_total") == 1.0
    assert '"event": "scrape_client_too_slow"' in listeners.log.read_text()
