"""The metrics listener with a web config (`--web.config.file`, `server.web_config_file`), as
Prometheus meets it: certificates made here, the exporter serving TLS with basic auth, a real
Prometheus scraping it with CA verification (and in a second case with its own client
certificate under RequireAndVerifyClientCert), probes open to the kubelet, and a certificate
rotated under the real process (new serial, same PID)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from cryptography import x509

from exporter.config import ConfigError
from exporter.runtime import PROBE_PATHS
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    free_port,
    launch_exporter,
    parse_exposition,
    require_tool,
    value,
    wait_for,
)
from tests.pki import LOOPBACK, Pki, make_pki, replace_file, served_serial
from tests.test_end_to_end import Processes, wait_ready

USER, PASSWORD = "prometheus", "tls-e2e-Scrape-pass"  # looked for in the logs below
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
RELOADED = "catalog_exporter_web_config_last_reload_successful"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    found = make_pki(tmp_path)
    found.server(serial=1)
    return found


def web_config(pki: Pki, *, users: bool = True, client_certs: bool = False) -> Path:
    """A web config next to the certificates (relative names, as exporter-toolkit reads them)."""
    document: dict[str, Any] = {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server-key.pem"},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    }
    if client_certs:
        document["tls_server_config"] |= {
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": "ca.pem",
        }
    if users:
        document["basic_auth_users"] = {USER: HASH}
    path = pki.directory / "web-config.yml"
    replace_file(path, yaml.safe_dump(document).encode())
    return path


async def fetch(
    url: str, *, context: ssl.SSLContext | bool, auth: bool = True
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": aiohttp.encode_basic_auth(USER, PASSWORD)} if auth else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


# In process: the listener as runtime.build wires it


async def test_the_metrics_listener_serves_tls_with_basic_auth_and_leaves_the_probes_open(
    pki: Pki, start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """With a web config, /metrics needs the password (401 with WWW-Authenticate without it),
    /healthz and /readyz answer without one (but only over TLS), every response carries the
    configured header, and the web config's gauges are exposed."""
    _, url = await start_simulator()
    path = web_config(pki)
    running = await start_exporter(fast_config(url, []), web_config_file=str(path))
    assert running.url.startswith("https://127.0.0.1:")
    trusted = pki.client_context()

    status, headers, body = await fetch(running.url + "metrics", context=trusted)
    assert status == 200
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert value(parse_exposition(body.decode()), RELOADED) == 1
    status, headers, _ = await fetch(running.url + "metrics", context=trusted, auth=False)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic realm=")
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, _ = await fetch(running.url, context=trusted, auth=False)  # the landing page
    assert status == 401
    for probe in PROBE_PATHS:
        # The kubelet verifies no certificate and sends no password.
        status, _, _ = await fetch(running.url + probe.lstrip("/"), context=False, auth=False)
        assert status == 200, probe
    plain = running.url.replace("https://", "http://") + "healthz"
    with pytest.raises(aiohttp.ClientError):
        await fetch(plain, context=False, auth=False)
    assert PASSWORD not in running.logs.getvalue()
    assert HASH not in running.logs.getvalue()


async def test_without_a_web_config_the_listener_is_plain_http_with_no_web_config_gauges(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """No web config: plain HTTP, no password asked, and none of its gauges."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))
    assert running.url.startswith("http://")
    status, _, body = await running.get("/metrics")
    assert status == 200
    assert RELOADED not in body.decode()
    assert running.runtime.web_config is None


async def test_a_bad_web_config_refuses_to_start_naming_the_key(
    pki: Pki, start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A web config with an unknown key stops the start with a ConfigError (exit 2 from the
    command line), logged as web_config_invalid, before anything listens."""
    _, url = await start_simulator()
    path = pki.directory / "web-config.yml"
    path.write_text("tls_server_config:\n  cert_fle: server.pem\n")
    with pytest.raises(ConfigError) as raised:
        await start_exporter(fast_config(url, []), web_config_file=str(path))
    assert any("cert_fle" in problem for problem in raised.value.problems)


# A real Prometheus


StartPrometheus = Callable[[dict[str, Any]], Awaitable[str]]


@pytest.fixture
async def start_prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """`url = await start_prometheus(scrape_config)`: Prometheus on loopback scraping once a
    second with that one scrape config."""
    processes = Processes()

    async def start(scrape: dict[str, Any]) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [{"job_name": "tls", **scrape}],
                }
            )
        )
        log = tmp_path / "prometheus.log"
        proc = processes.start(
            [
                require_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            log,
        )
        url = f"http://127.0.0.1:{port}"
        await wait_ready(f"{url}/-/ready", proc, log)
        return url

    try:
        yield start
    finally:
        processes.stop_all()


async def scraped_up(prometheus: str) -> tuple[float | None, str]:
    """The target's `up` and its last scrape error, as Prometheus reports them."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{prometheus}/api/v1/targets") as response:
            targets = (await response.json())["data"]["activeTargets"]
        async with session.get(f"{prometheus}/api/v1/query", params={"query": "up"}) as response:
            result = (await response.json())["data"]["result"]
    error = targets[0]["lastError"] if targets else "no target"
    return (float(result[0]["value"][1]) if result else None), error


async def wait_up(prometheus: str) -> None:
    """Wait until Prometheus has scraped the exporter successfully (`up == 1`)."""
    seen: list[str] = []

    async def up() -> bool:
        found, error = await scraped_up(prometheus)
        seen.append(error)
        return found == 1

    try:
        await wait_for(up, timeout=30, interval=0.5)
    except pytest.fail.Exception:
        pytest.fail(f"Prometheus never scraped the exporter; last errors: {seen[-3:]}")


@pytest.mark.slow
async def test_prometheus_scrapes_over_tls_verifying_the_ca_with_basic_auth(
    pki: Pki,
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    start_prometheus: StartPrometheus,
) -> None:
    """A real Prometheus with `scheme: https`, the CA file and basic auth scrapes `up == 1`,
    and stores the web config's gauge."""
    _, url = await start_simulator()
    path = web_config(pki)
    running = await start_exporter(fast_config(url, []), web_config_file=str(path))
    target = running.url.split("://")[1].rstrip("/")
    prometheus = await start_prometheus(
        {
            "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca_file)},
            "basic_auth": {"username": USER, "password": PASSWORD},
            "static_configs": [{"targets": [target]}],
        }
    )
    await wait_up(prometheus)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{prometheus}/api/v1/query", params={"query": RELOADED}) as response,
    ):
        result = (await response.json())["data"]["result"]
    assert [sample["value"][1] for sample in result] == ["1"]


@pytest.mark.slow
async def test_prometheus_scrapes_with_its_client_certificate_under_require_and_verify(
    pki: Pki,
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    start_prometheus: StartPrometheus,
) -> None:
    """Under RequireAndVerifyClientCert, Prometheus's client certificate (signed by the CA
    the web config names) gets `up == 1`; a client without one fails the handshake."""
    _, url = await start_simulator()
    path = web_config(pki, users=False, client_certs=True)
    running = await start_exporter(fast_config(url, []), web_config_file=str(path))
    cert, key = pki.issue("prometheus", serial=7, sans=[x509.DNSName("prometheus")], client=True)
    with pytest.raises(aiohttp.ClientError):
        await fetch(running.url + "metrics", context=pki.client_context(), auth=False)
    target = running.url.split("://")[1].rstrip("/")
    prometheus = await start_prometheus(
        {
            "scheme": "https",
            "tls_config": {
                "ca_file": str(pki.ca_file),
                "cert_file": str(cert),
                "key_file": str(key),
            },
            "static_configs": [{"targets": [target]}],
        }
    )
    await wait_up(prometheus)


# The real process


@pytest.mark.slow
async def test_a_rotated_certificate_reaches_new_connections_of_the_same_process(
    pki: Pki, tmp_path: Path, start_simulator: SimulatorFactory
) -> None:
    """`python -m exporter` with `server.web_config_file` in its config: replacing the
    certificate (as cert-manager does) gives the next handshake the new serial, with the same
    PID, and no password or hash appears in its log."""
    _, url = await start_simulator()
    path = web_config(pki)
    port = free_port()
    config = {
        "api": {"base_url": url, "auth": {"type": "none"}, "timeout_seconds": 2},
        "ingestions": {"ids": ["rotated"]},
        "server": {"host": "127.0.0.1", "port": port, "web_config_file": str(path)},
        "admin": {"enabled": False},
        "reload": {"watch_interval_seconds": 0},
    }
    proc, log = launch_exporter(tmp_path, config)
    pid = proc.pid
    context = pki.client_context()
    try:

        async def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return await served_serial(port, context) == 1
            except OSError:
                return False

        await wait_for(serving, timeout=20, interval=0.1)
        pki.issue("server", serial=2, sans=[x509.IPAddress(LOOPBACK)])

        async def rotated() -> bool:
            return await served_serial(port, context) == 2

        await wait_for(rotated, timeout=10, interval=0.1)
        assert proc.poll() is None
        assert proc.pid == pid
        status, _, body = await fetch(f"https://127.0.0.1:{port}/metrics", context=context)
        assert status == 200
        assert value(parse_exposition(body.decode()), RELOADED) == 1
    finally:
        proc.terminate()
        code = proc.wait(timeout=20)
    text = log.read_text()
    assert code == 0, text
    assert '"web_config_reloaded"' in text
    assert PASSWORD not in text
    assert HASH not in text
