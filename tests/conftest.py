"""Shared fixtures: a real simulator and a real exporter, both on loopback HTTP.

The exporter is built and started by `exporter.runtime.build`, as in production: the same
listeners, supervisor, GC freeze and switch interval (only the signals are left out).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from botocore.credentials import Credentials
from prometheus_client.parser import text_string_to_metric_families

from exporter.auth import RequestAuth, SigV4Auth
from exporter.auth_setup import auth_from_config
from exporter.config import AuthConfig, Config, parse_config
from exporter.runtime import Runtime, build
from exporter.scheduler import Poller
from exporter.service import Exporter
from exporter.simulator import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY, Simulator
from exporter.simulator import create_app as create_simulator_app
from exporter.supervisor import Stage, Supervisor

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_exposition(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the series is absent."""
    return samples.get((name, frozenset(labels.items())))


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll an async condition until it holds; fail the test with a clear message if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s")


def require_tool(name: str) -> str:
    """A tool's path: the test extras' (beside this Python), else Debian's on PATH.

    A missing tool fails the test: `make test` installs every one of them.
    """
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is required: `make test` installs it (test extras or Debian packages)"
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def supervise_poller(poller: Poller, grace_seconds: float) -> Supervisor:
    """The poller started as the exporter starts it: the store scheduled, `run` under a
    supervisor, its polls in flight given `grace_seconds` when the supervisor stops."""
    poller.schedule_store()
    supervisor = Supervisor()
    supervisor.start("poller", poller.run, Stage.POLLING, after=lambda: poller.drain(grace_seconds))
    return supervisor


def free_port_pair() -> int:
    """A free port whose two successors are free too (the demo's admin API takes port + 1,
    its signing proxy port + 2)."""
    for _ in range(100):
        port = free_port()
        if port + 2 > 65535:
            continue
        try:
            with socket.socket() as one, socket.socket() as two:
                one.bind(("127.0.0.1", port + 1))
                two.bind(("127.0.0.1", port + 2))
        except OSError:
            continue
        return port
    pytest.fail("no three consecutive free ports")


def requests_seen(
    simulator: Simulator, ingestion_id: str, n: int = 1
) -> Callable[[], Awaitable[bool]]:
    """A `wait_for` condition: the simulator received at least `n` requests for the id."""

    async def condition() -> bool:
        return simulator.count(ingestion_id=ingestion_id) >= n

    return condition


def simulator_sigv4_auth(_: AuthConfig) -> RequestAuth:
    """Sign with the simulator's fixed test key instead of the AWS chain."""
    return SigV4Auth(
        region=TEST_REGION, credentials=Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
    )


class RunningExporter:
    """An exporter served on loopback (and its admin API), with helpers to scrape it."""

    def __init__(self, runtime: Runtime, logs: io.StringIO) -> None:
        assert runtime.url is not None, "started"
        self.runtime = runtime
        self.exporter: Exporter = runtime.exporter
        self.logs = logs
        self.url = runtime.url + "/"
        self.admin_url = runtime.admin_url
        self.proxy_url = runtime.proxy_url

    async def stop(self) -> None:
        """Stop it as SIGTERM would (listeners, then the background work in order)."""
        await self.runtime.stop()

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        async with (
            ClientSession() as session,
            session.get(self.url + path.lstrip("/"), headers=headers) as response,
        ):
            return response.status, dict(response.headers), await response.read()

    async def scrape(self) -> Samples:
        status, _, body = await self.get("/metrics")
        assert status == 200
        return parse_exposition(body.decode())

    def status_is(self, ingestion_id: str, status: str | None) -> Callable[[], Awaitable[bool]]:
        """A `wait_for` condition: the upload's one-hot status is `status` (None: no series)."""

        async def condition() -> bool:
            return await self.status_of(ingestion_id) == status

        return condition

    async def status_of(self, ingestion_id: str) -> str | None:
        """The status whose one-hot series is 1, or None if the upload has no series."""
        samples = await self.scrape()
        hot = [
            dict(labels)["status"]
            for (name, labels), v in samples.items()
            if name == "catalog_upload_status"
            and dict(labels)["ingestion_id"] == ingestion_id
            and v == 1.0
        ]
        return hot[0] if hot else None


SimulatorFactory = Callable[..., Awaitable[tuple[Simulator, str]]]
ExporterFactory = Callable[..., Awaitable[RunningExporter]]


@pytest.fixture
async def serve_simulator() -> AsyncIterator[Callable[[Simulator], Awaitable[str]]]:
    """Serve simulators on loopback: `base_url = await serve_simulator(sim)`."""
    servers: list[TestServer] = []

    async def serve(simulator: Simulator) -> str:
        server = TestServer(create_simulator_app(simulator), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield serve
    for server in servers:
        await server.close()


@pytest.fixture
def start_simulator(
    serve_simulator: Callable[[Simulator], Awaitable[str]],
) -> SimulatorFactory:
    """Start simulators with no rate limit unless asked: `sim, url = await start_simulator()`."""

    async def start(**options: Any) -> tuple[Simulator, str]:
        options.setdefault("rate_limit", None)
        simulator = Simulator(**options)
        return simulator, await serve_simulator(simulator)

    return start


def fast_config(base_url: str, ids: list[str], **overrides: Any) -> Config:
    """A config that polls every 0.2 s, with `overrides` merged into its sections."""
    document: dict[str, Any] = {
        "api": {
            "base_url": base_url,
            "auth": {"type": "none"},
            "timeout_seconds": 2,
            "max_requests_per_second": 200,
            "max_concurrency": 8,
        },
        "polling": {
            "interval_seconds": 0.2,
            "initial_backoff_seconds": 0.05,
            "max_backoff_seconds": 0.4,
            "invalid_retry_seconds": 60,
        },
        "ingestions": {"ids": ids},
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"port": 0},
        "logging": {"level": "debug"},
    }
    for section, values in overrides.items():
        document.setdefault(section, {}).update(values)
    return parse_config(document)


@pytest.fixture
async def start_exporter() -> AsyncIterator[ExporterFactory]:
    """Start exporters on loopback through the production builder (`runtime.build`):
    `running = await start_exporter(config, auth_factory=...)`; `config_path` adds the
    reloader. Every one is stopped at the end."""
    started: list[Runtime] = []

    async def start(config: Config, **kwargs: Any) -> RunningExporter:
        logs = io.StringIO()
        kwargs.setdefault("auth_factory", auth_from_config)
        runtime = build(config, log_stream=logs, **kwargs)
        started.append(runtime)
        await runtime.start()
        return RunningExporter(runtime, logs)

    yield start
    for runtime in reversed(started):
        await runtime.stop()


#: How the tests start the exporter: as `python -m exporter`, with this Python.
EXPORTER_COMMAND = (sys.executable, "-m", "exporter")


def launch(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start a process whose stdout and stderr both go to `log` (read it as it grows); the
    one place the tests start the exporter, or the simulator, as a process of its own."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=stdin, env=env, cwd=cwd
        )


def assert_own_ports(config: Mapping[str, Any]) -> None:
    """A config a test process runs on names its admin API's and proxy's ports or turns
    them off: their defaults (10185, 10186) are shared by every test running at once, and a
    second exporter on them exits with cannot_listen (a flaky failure under xdist)."""
    for section in ("admin", "proxy"):
        settings = config.get(section) or {}
        enabled = settings.get("enabled", section == "admin")
        assert not enabled or "port" in settings, f"{section}: set port (0 for any) or disable it"


def launch_exporter(
    directory: Path,
    config: Mapping[str, Any] | Path | None,
    *,
    args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `python -m exporter` on `config` (a mapping is written to
    directory/config.yaml; a path is used as it is; None gives no --config), then `args`,
    behind `prefix` (a wrapper such as prlimit). Its output goes to a new
    directory/exporter[-N].log, returned beside the process."""
    argv = [*prefix, *EXPORTER_COMMAND]
    if isinstance(config, Path):
        argv += ["--config", str(config)]
    elif config is not None:
        assert_own_ports(config)
        config_file = directory / "config.yaml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        argv += ["--config", str(config_file)]
    argv += args
    log = directory / "exporter.log"
    for n in itertools.count(2):
        if not log.exists():
            break
        log = directory / f"exporter-{n}.log"
    return launch(argv, log, env=env, cwd=cwd, stdin=stdin), log
