"""The flags every Go exporter takes: `--web.listen-address` (parsed, then served by the real
process) and `--web.config.file` (checked by `--check-config`, refused at start when bad)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from exporter.cli import parse_listen_address
from tests.conftest import free_port, launch_exporter
from tests.test_cli import EXPORTER, Process, wait_http


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:10184", ("::1", 10184)),
        ("[::]:10184", ("::", 10184)),
        (":10184", ("", 10184)),
    ],
)
def test_a_listen_address_is_host_port_bracketed_ipv6_or_just_a_port(
    text: str, expected: tuple[str, int]
) -> None:
    """host:port, [IPv6]:port and :port (every interface) are read as Go exporters read them."""
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("10184", "expected host:port"),
        ("::1:10184", "IPv6 address goes in brackets"),
        ("[::1]10184", "expected [IPv6 address]:port"),
        ("[::1", "expected [IPv6 address]:port"),
        ("[example.com]:1", "is not an IPv6 address"),
        ("127.0.0.1:65536", "from 0 to 65535"),
        ("127.0.0.1:", "from 0 to 65535"),
        ("127.0.0.1:http", "from 0 to 65535"),
        ("127.0.0.1:-1", "from 0 to 65535"),
        ("my host:80", "is not a host name or address"),
    ],
)
def test_a_bad_listen_address_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    """Each malformed address gets a message that names the problem."""
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_listen_address(text)


def write_config(directory: Path, **server: object) -> Path:
    """A valid config whose polls go to a closed port (nothing here needs them to succeed)."""
    config = {
        "api": {"base_url": f"http://127.0.0.1:{free_port()}", "auth": {"type": "none"}},
        "ingestions": {"ids": ["flag-test"]},
        "server": {"host": "127.0.0.1", "port": free_port(), **server},
        "admin": {"enabled": False},
        "reload": {"watch_interval_seconds": 0},
    }
    path = directory / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXPORTER, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_web_listen_address_with_only_a_port_serves_every_interface_instead_of_the_config(
    tmp_path: Path,
) -> None:
    """`--web.listen-address :PORT` wins over server.host and server.port: the process
    answers on loopback at PORT, and stops cleanly."""
    port = free_port()
    proc = Process(
        *launch_exporter(
            tmp_path, write_config(tmp_path), args=["--web.listen-address", f":{port}"]
        )
    )
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz") == "ok\n"
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--web.listen-address", "10184"], "--web.listen-address: expected host:port"),
        (["--web.listen-address", ":1", "--port", "2"], "not both"),
        (["--demo", "--web.config.file", "web.yml"], "need --config"),
    ],
)
def test_a_bad_use_of_the_web_flags_exits_2_naming_the_flag(
    tmp_path: Path, args: list[str], says: str
) -> None:
    """A usage error, before anything starts."""
    config = [] if "--demo" in args else ["--config", str(write_config(tmp_path))]
    result = run(*config, *args)
    assert result.returncode == 2
    assert says in result.stderr


def test_check_config_checks_the_web_config_named_by_the_config_or_the_flag(
    tmp_path: Path,
) -> None:
    """--check-config reads the web config too (server.web_config_file, or the flag, which
    wins), naming a bad key; a valid one passes."""
    bad, good = tmp_path / "bad.yml", tmp_path / "good.yml"
    bad.write_text("basic_auth_users:\n  prometheus: not-a-hash\nheaders: {}\n")
    good.write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    config = write_config(tmp_path, web_config_file=str(bad))
    result = run("--config", str(config), "--check-config")
    assert result.returncode == 2
    assert f"invalid web config in {bad}" in result.stderr
    assert "headers: unknown key" in result.stderr
    assert "not-a-hash" not in result.stderr  # a hash-shaped secret is never quoted
    result = run("--config", str(config), "--check-config", "--web.config.file", str(good))
    assert result.returncode == 0, result.stderr


def test_a_bad_web_config_at_start_exits_2_logging_its_problems(tmp_path: Path) -> None:
    """Serving with a web config whose certificate does not exist: exit 2, the problem
    logged as web_config_invalid, nothing left listening."""
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing-key.pem\n")
    config = write_config(tmp_path)
    result = run("--config", str(config), "--web.config.file", str(web))
    assert result.returncode == 2, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (invalid,) = [e for e in events if e["event"] == "web_config_invalid"]
    assert "missing.pem" in invalid["problems"][0]
    assert "Traceback" not in result.stdout + result.stderr
