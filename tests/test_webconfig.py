"""The web config (exporter-toolkit's format): real TLS handshakes on loopback with
certificates made here, basic auth, rotation without a restart, and its error wording."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import structlog
from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry

from exporter.config import ConfigError
from exporter.metrics import WebConfigMetrics
from exporter.webconfig import BasicAuth, WebConfigWatcher, install, load_web_config
from tests.pki import LOOPBACK, Pki, make_pki, replace_file, served_serial

PASSWORD = "s3cret-Scrape-pass"  # a test password: looked for in the logs below
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


# A listener guarded by a watcher


@dataclass
class Served:
    watcher: WebConfigWatcher
    url: str
    port: int
    registry: CollectorRegistry


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Path], object]]:
    """Start an aiohttp app on loopback with the web config at the given path."""
    runners: list[web.AppRunner] = []

    async def start(path: Path) -> Served:
        registry = CollectorRegistry()
        watcher = WebConfigWatcher(path, metrics=WebConfigMetrics(registry))
        app = web.Application()

        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app.router.add_get("/metrics", hello)
        install(app, lambda: watcher.settings)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=watcher.listener_context)
        await site.start()
        port = runner.addresses[0][1]
        scheme = "https" if watcher.listener_context is not None else "http"
        return Served(watcher, f"{scheme}://127.0.0.1:{port}/metrics", port, registry)

    yield start
    for runner in runners:
        await runner.cleanup()


def write_config(pki: Pki, text: str) -> Path:
    path = pki.directory / "web-config.yml"
    replace_file(path, text.encode())
    return path


def basic(user: str, password: str) -> str:
    return aiohttp.encode_basic_auth(user, password)


async def get(
    url: str, *, context: ssl.SSLContext | None = None, auth: str | None = None
) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, ssl=context if context is not None else False, headers=headers
        ) as response,
    ):
        await response.read()
        return response.status, dict(response.headers)


def tls_config(**extra: str) -> str:
    lines = ["tls_server_config:", "  cert_file: server.pem", "  key_file: server-key.pem"]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


# The behaviours


async def test_a_wrong_password_gets_401_with_www_authenticate_and_the_right_one_passes(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """Basic auth over TLS: no or wrong credentials are 401 with a Basic challenge; the
    configured headers are on every answer, the 401s too."""
    pki.server(serial=1)
    path = write_config(
        pki,
        tls_config()
        + f"basic_auth_users:\n  prometheus: '{HASH}'\n"
        + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
    )
    served: Served = await serve(path)  # type: ignore[misc]
    context = pki.client_context()
    for auth in (None, basic("prometheus", "wrong"), basic("x", PASSWORD)):
        status, headers = await get(served.url, context=context, auth=auth)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith('Basic realm="')
        assert headers["X-Frame-Options"] == "deny"
    status, headers = await get(served.url, context=context, auth=basic("prometheus", PASSWORD))
    assert status == 200
    assert headers["X-Frame-Options"] == "deny"


async def test_a_verified_password_is_cached_and_a_wrong_one_never_hits_the_cache() -> None:
    """The cache answers only the exact user, password and hash it verified (the lesson of
    CVE-2022-46146): a wrong password, or a right one for another user, runs bcrypt and fails."""
    other = bcrypt.hashpw(b"other-pass", bcrypt.gensalt(rounds=4)).decode()
    auth = BasicAuth({"prometheus": HASH, "grafana": other})

    assert await auth.check(basic("prometheus", PASSWORD)) is True
    assert auth.bcrypt_runs == 1
    assert await auth.check(basic("prometheus", PASSWORD)) is True
    assert auth.bcrypt_runs == 1  # from the cache
    assert await auth.check(basic("prometheus", PASSWORD + "x")) is False
    assert await auth.check(basic("grafana", PASSWORD)) is False
    assert await auth.check(basic("nobody", PASSWORD)) is False
    assert await auth.check(basic("prometheus", "p" * 100)) is False  # over bcrypt's 72 bytes
    assert auth.bcrypt_runs == 5
    for header in (None, "", "Bearer x", "Basic !!!", "Basic " + "bm9jb2xvbg=="):
        assert await auth.check(header) is False


async def test_a_client_without_a_certificate_fails_under_require_and_verify_client_cert(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """RequireAndVerifyClientCert: no certificate, no answer; one the CA signed gets 200."""
    pki.server(serial=1)
    client = pki.issue("client", serial=7, sans=[x509.DNSName("prometheus.example")], client=True)
    path = write_config(
        pki, tls_config(client_auth_type="RequireAndVerifyClientCert", client_ca_file="ca.pem")
    )
    served: Served = await serve(path)  # type: ignore[misc]
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await get(served.url, context=pki.client_context())
    status, _ = await get(served.url, context=pki.client_context(cert=client))
    assert status == 200


async def test_client_allowed_sans_refuse_a_verified_client_whose_san_is_not_listed(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """client_allowed_sans: a certificate the CA signed, naming another SAN, gets 403."""
    pki.server(serial=1)
    client = pki.issue("client", serial=7, sans=[x509.DNSName("grafana.example")], client=True)
    path = write_config(
        pki,
        tls_config(client_auth_type="RequireAndVerifyClientCert", client_ca_file="ca.pem")
        + "  client_allowed_sans: [prometheus.example, 127.0.0.1]\n",
    )
    served: Served = await serve(path)  # type: ignore[misc]
    status, _ = await get(served.url, context=pki.client_context(cert=client))
    assert status == 403
    allowed = pki.issue("client", serial=8, sans=[x509.IPAddress(LOOPBACK)], client=True)
    status, _ = await get(served.url, context=pki.client_context(cert=allowed))
    assert status == 200


async def test_a_tls12_only_client_fails_under_min_version_tls13(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """min_version: TLS13 refuses a client that speaks at most TLS 1.2 (and the default,
    TLS12, accepts it)."""
    pki.server(serial=1)
    served: Served = await serve(write_config(pki, tls_config(min_version="TLS13")))  # type: ignore[misc]
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await served_serial(served.port, old)
    assert await served_serial(served.port, pki.client_context()) == 1
    default: Served = await serve(write_config(pki, tls_config()))  # type: ignore[misc]
    assert await served_serial(default.port, old) == 1


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """cert-manager replaces the files: the next handshake on the same listener gets the new
    serial; a bad file is logged and counted and the last good one stays in force."""
    pki.server(serial=1)
    served: Served = await serve(write_config(pki, tls_config()))  # type: ignore[misc]
    context = pki.client_context()
    listener = served.watcher.listener_context
    assert await served_serial(served.port, context) == 1
    assert await asyncio.to_thread(served.watcher.check) is None  # nothing changed

    pki.server(serial=2)
    settings = await asyncio.to_thread(served.watcher.check)
    assert settings is not None
    served.watcher.apply(settings)
    assert await served_serial(served.port, context) == 2
    assert served.watcher.listener_context is listener

    (pki.directory / "server.pem").write_text("not a certificate\n")
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.to_thread(served.watcher.check) is None
    assert [entry["event"] for entry in logs] == ["web_config_reload_failed"]
    assert "server.pem" in logs[0]["problems"][0]
    gauge = "catalog_exporter_web_config_last_reload_successful"
    assert served.registry.get_sample_value(gauge) == 0
    assert await served_serial(served.port, context) == 2  # the last good one

    pki.server(serial=3)
    settings = await asyncio.to_thread(served.watcher.check)
    assert settings is not None
    served.watcher.apply(settings)
    assert served.registry.get_sample_value(gauge) == 1
    assert await served_serial(served.port, context) == 3


async def test_the_watch_loop_applies_a_change_of_the_web_config_itself(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """A new min_version in the web config reaches the listener through `watch`: the loop
    checks after each (injected) sleep."""
    pki.server(serial=1)
    path = write_config(pki, tls_config())
    served: Served = await serve(path)  # type: ignore[misc]
    ticks: asyncio.Queue[None] = asyncio.Queue()
    applied = asyncio.Event()

    async def sleep(_: float) -> None:
        if served.watcher.settings.config.tls_server_config.min_version == "TLS13":
            applied.set()
        await ticks.get()

    task = asyncio.create_task(served.watcher.watch(sleep=sleep))
    try:
        write_config(pki, tls_config(min_version="TLS13"))
        ticks.put_nowait(None)
        ticks.put_nowait(None)
        await asyncio.wait_for(applied.wait(), timeout=10)  # a bound, not a timing
    finally:
        task.cancel()
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await served_serial(served.port, old)


async def test_turning_tls_off_by_a_reload_is_refused_and_tls_stays(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """The listener serves HTTPS from its start: a reload without tls_server_config fails."""
    pki.server(serial=1)
    path = write_config(pki, tls_config())
    served: Served = await serve(path)  # type: ignore[misc]
    write_config(pki, "basic_auth_users: {}\n")
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.to_thread(served.watcher.check) is None
    assert "needs a restart" in logs[0]["problems"][0]
    assert await served_serial(served.port, pki.client_context()) == 1


async def test_without_tls_the_listener_serves_plain_http_with_basic_auth(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """basic_auth_users alone: plain HTTP, 401 without credentials, and a warning."""
    path = write_config(pki, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    with structlog.testing.capture_logs() as logs:
        served: Served = await serve(path)  # type: ignore[misc]
    assert served.watcher.listener_context is None
    assert "clear text" in logs[0]["warning"]
    assert (await get(served.url))[0] == 401
    assert (await get(served.url, auth=basic("prometheus", PASSWORD)))[0] == 200


def test_an_empty_web_config_asks_for_nothing(tmp_path: Path) -> None:
    """As exporter-toolkit: an empty file is plain HTTP without authentication."""
    path = tmp_path / "web.yml"
    path.write_text("")
    config = load_web_config(path)
    assert not config.tls_server_config.enabled
    assert not config.basic_auth_users


def test_relative_file_names_are_relative_to_the_web_config_file(tmp_path: Path) -> None:
    """As exporter-toolkit's SetDirectory: not the working directory."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "web.yml"
    path.write_text(tls_config(client_auth_type="VerifyClientCertIfGiven", client_ca_file="/c"))
    tls = load_web_config(path).tls_server_config
    assert tls.cert_file == str(tmp_path / "conf" / "server.pem")
    assert tls.key_file == str(tmp_path / "conf" / "server-key.pem")
    assert tls.client_ca_file == "/c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tls_server_config:\n  cert_fle: a.pem\n",
            "tls_server_config.cert_fle: unknown key; did you mean 'cert_file'?",
        ),
        ("basic_auth_user: {}\n", "basic_auth_user: unknown key; did you mean 'basic_auth_users'?"),
        ("http_server_config:\n  header: {}\n", "http_server_config.header: unknown key"),
        (
            tls_config(client_auth_type="RequireAndVerifyClientCert"),
            "tls_server_config.client_ca_file: required with client_auth_type "
            "RequireAndVerifyClientCert",
        ),
        (
            tls_config(client_auth_type="RequireAnyClientCert"),
            "tls_server_config.client_auth_type: RequireAnyClientCert is not supported",
        ),
        (
            tls_config(client_auth_type="RequireClientCerts"),
            "tls_server_config.client_auth_type: expected one of NoClientCert, ",
        ),
        (tls_config(min_version="TLS11"), "tls_server_config.min_version: TLS 1.0 and 1.1"),
        (
            tls_config(min_version="TLS13", max_version="TLS12"),
            "tls_server_config.min_version: TLS13 is above max_version TLS12",
        ),
        (
            tls_config(cipher_suites="[TLS_AES_128_GCM_SHA256]"),
            "tls_server_config.cipher_suites: not supported: these are Go's names",
        ),
        (
            tls_config(curve_preferences="[X25519]"),
            "tls_server_config.curve_preferences: not supported",
        ),
        ("tls_server_config:\n  key_file: k.pem\n", "tls_server_config: TLS needs a certificate"),
        (
            tls_config(client_ca_file="ca.pem"),
            "tls_server_config.client_ca_file: a client CA is given but client_auth_type is "
            "NoClientCert",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Option: deny\n",
            "http_server_config.headers: X-Frame-Option cannot be configured; the headers are "
            "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, "
            "X-XSS-Protection, Content-Security-Policy; did you mean 'X-Frame-Options'?",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            "http_server_config.headers: X-Frame-Options: expected one of deny, sameorigin",
        ),
        ("rate_limit:\n  interval: 1s\n", "rate_limit: not supported"),
        ("http_server_config:\n  http2: 'no'\n", "http_server_config.http2: expected true or"),
        ("- a\n", "(top level): expected a mapping, got a list"),
    ],
)
def test_a_bad_web_config_is_refused_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Unknown keys and what Python's ssl cannot do are refused in our config's words, each
    line starting with the file's name."""
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert any(
        line == f"{path}: {expected}" or line.startswith(f"{path}: {expected}")
        for line in caught.value.problems
    ), caught.value.problems


async def test_no_password_or_hash_reaches_a_log_or_an_error(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """A wrong password, a bad hash in a reload, and a hash pasted as a user name: neither
    the password nor a hash appears in the log or in the config errors."""
    pki.server(serial=1)
    path = write_config(pki, tls_config() + f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    with structlog.testing.capture_logs() as logs:
        served: Served = await serve(path)  # type: ignore[misc]
        context = pki.client_context()
        await get(served.url, context=context, auth=basic("prometheus", "wrong"))
        await get(served.url, context=context, auth=basic("prometheus", PASSWORD))
        broken = HASH[:-1]  # one character short: not a bcrypt hash
        write_config(
            pki, tls_config() + f"basic_auth_users:\n  prometheus: '{broken}'\n  '{HASH}': x\n"
        )
        assert await asyncio.to_thread(served.watcher.check) is None
    text = repr(logs)
    assert "web_config_reload_failed" in text
    for secret in (PASSWORD, HASH, broken, "wrong"):
        assert secret not in text
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert HASH[:20] not in str(caught.value)
    assert "got a string of 59 characters (not shown)" in str(caught.value)


def test_the_web_config_in_docs_security_is_valid(tmp_path: Path) -> None:
    """The ready-to-copy web config of docs/security.md loads as it stands."""
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    section = text.split("## TLS and authentication", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "web.yml"
    path.write_text(block)
    config = load_web_config(path)
    assert config.tls_server_config.client_auth_type == "RequireAndVerifyClientCert"
    assert list(config.basic_auth_users) == ["prometheus"]
    assert config.warnings() == []


async def test_an_inline_certificate_and_key_are_served(
    pki: Pki, serve: Callable[[Path], object]
) -> None:
    """cert and key inline (exporter-toolkit's alternative to the files) work the same."""
    cert, key = pki.server(serial=5)
    text = (
        "tls_server_config:\n"
        f"  cert: {json.dumps(cert.read_text())}\n"
        f"  key: {json.dumps(key.read_text())}\n"
    )
    served: Served = await serve(write_config(pki, text))  # type: ignore[misc]
    assert await served_serial(served.port, pki.client_context()) == 5
