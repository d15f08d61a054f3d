"""`catalog-upload-exporter --demo`: the exporter against the embedded simulator.

No config and no credentials: the simulator runs in-process on a free loopback port, checks
SigV4 signatures made with its fixed test key, throttles at 4 requests/s and fails about 5%
of requests, so the demo shows every status, throttling and errors within a minute. The
admin API listens on loopback at the metrics port + 1, and the banner shows what to try.
"""

from __future__ import annotations

import math
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from aiohttp import web
from botocore.credentials import Credentials

from exporter.auth import RequestAuth, SigV4Auth
from exporter.config import (
    DEFAULT_PORT,
    AdminConfig,
    ApiConfig,
    AuthConfig,
    Config,
    IngestionsConfig,
    LoggingConfig,
    PollingConfig,
    ProxyConfig,
    ServerConfig,
)
from exporter.runtime import Runtime, build
from exporter.simulator import (
    DEMO_INVALID_IDS,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    UPLOAD_PATHS,
    SimulatedUpload,
    Simulator,
    demo_uploads,
)
from exporter.simulator import create_app as create_simulator_app

#: The simulator's limit is below the exporter's, so the demo shows throttling and AIMD.
SIMULATOR_RATE_LIMIT = 4.0
EXPORTER_RATE_LIMIT = 8.0
#: The demo upload whose processing report the banner shows how to fetch (FATAL after ~10 s).
REPORT_EXAMPLE_ID = "demo-fatal"

#: An upload the simulator knows but the demo does not track: the banner's `register`
#: example, so registering it shows a new upload being polled through to DONE.
REGISTER_EXAMPLE = SimulatedUpload(
    "demo-register-me", [("INQUEUE", 4), ("INPROGRESS", 6), ("DONE", math.inf)]
)

#: Lines of the one-hot status series whose value is 1: each upload's current status.
STATUS_IS_ONE = r"^catalog_upload_status\{.*\} 1(\.0)?$"


def admin_port_for(port: int) -> int:
    """The demo's admin API port: the metrics port + 1 (10185 by default); any free one
    when the metrics port is 0 or the last port."""
    return port + 1 if 0 < port < 65535 else 0


def proxy_port_for(port: int) -> int:
    """The demo's signing proxy port: the metrics port + 2 (10186 by default); any free one
    when the metrics port is 0 or one of the last two."""
    return port + 2 if 0 < port < 65534 else 0


def demo_config(base_url: str, port: int) -> Config:
    """A config polling every 2 s, so that the demo moves quickly."""
    uploads = [u.ingestion_id for u in demo_uploads()]
    return Config(
        api=ApiConfig(
            base_url=base_url,
            auth=AuthConfig(type="sigv4", region=TEST_REGION),
            timeout_seconds=2.0,
            max_requests_per_second=EXPORTER_RATE_LIMIT,
            max_concurrency=4,
            report_hosts=(_simulator_host(base_url),),
        ),
        polling=PollingConfig(
            interval_seconds=2.0,
            terminal_retention_seconds=3600.0,
            invalid_retry_seconds=30.0,
            initial_backoff_seconds=0.5,
            max_backoff_seconds=10.0,
        ),
        ingestions=IngestionsConfig(ids=(*uploads, *DEMO_INVALID_IDS)),
        server=ServerConfig(host="127.0.0.1", port=port),
        admin=AdminConfig(host="127.0.0.1", port=admin_port_for(port)),
        proxy=ProxyConfig(enabled=True, port=proxy_port_for(port)),
        logging=LoggingConfig(level="info", format="console"),
    )


def _simulator_host(base_url: str) -> str:
    """The simulator's host: its report links point there, on loopback, over plain http, so
    it must be listed in api.report_hosts."""
    return urlsplit(base_url).hostname or "127.0.0.1"


def _simulator_auth(_: AuthConfig) -> RequestAuth:
    credentials = Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
    return SigV4Auth(region=TEST_REGION, credentials=credentials)


def write_report_config(base_url: str, directory: Path) -> Path:
    """A config for `catalog-upload-exporter report` against the demo's simulator."""
    document = {
        "api": {
            "base_url": base_url,
            "auth": {"type": "sigv4", "region": TEST_REGION},
            "report_hosts": [_simulator_host(base_url)],
        },
        "ingestions": {"ids": []},
        "logging": {"level": "warning", "format": "console"},
    }
    path = directory / "report-config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def report_example(config_path: Path, command: str = "catalog-upload-exporter") -> str:
    """The shell line that downloads a FATAL demo upload's report: the simulator checks
    SigV4 with its published test key, which the AWS variables hand to the credential chain."""
    return (
        f"AWS_ACCESS_KEY_ID={TEST_ACCESS_KEY_ID} AWS_SECRET_ACCESS_KEY={TEST_SECRET_ACCESS_KEY} "
        f"{command} report --config {shlex.quote(str(config_path))} "
        f"{REPORT_EXAMPLE_ID}"
    )


def cli_command(
    argv0: str,
    cwd: Path,
    python: str,
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """This program's command as a shell line can run it from `cwd`: the bare name when PATH
    finds this very program; else the path it was started by (relative to `cwd` when under
    it, as `make demo` starts .venv/bin/catalog-upload-exporter from the clone); else
    `python -m exporter` with this interpreter."""
    started = Path(argv0)
    if started.name == "catalog-upload-exporter" and (cwd / started).is_file():
        path = started if started.is_absolute() else cwd / started
        found = which("catalog-upload-exporter")
        if found is not None and Path(found).resolve() == path.resolve():
            return "catalog-upload-exporter"
        try:
            shown = str(path.relative_to(cwd))
        except ValueError:
            shown = str(path)
        return shlex.quote(shown if "/" in shown else f"./{shown}")
    return f"{shlex.quote(python)} -m exporter"


def _announce(runtime: Runtime, report_config: Path) -> None:
    url = runtime.url
    admin = runtime.admin_url or "http://127.0.0.1:<admin port>"
    proxy = runtime.proxy_url or "http://127.0.0.1:<proxy port>"
    command = cli_command(sys.argv[0], Path.cwd(), sys.executable)
    print(
        f"\ncatalog-upload-exporter demo is running.\n"
        f"  landing page: {url}/\n"
        f"  metrics:      {url}/metrics\n"
        f"  admin API:    {admin}/api/v1/ingestions\n"
        f"Try:\n"
        f"  curl -s {url}/metrics | grep -E '{STATUS_IS_ONE}'\n"
        f"      each upload's current status (the one-hot series that are 1)\n"
        f"  curl -s {admin}/api/v1/ingestions\n"
        f"      what is tracked, with sources and last poll\n"
        f"  {command} register {REGISTER_EXAMPLE.ingestion_id} --url {admin}\n"
        f"      track one more upload, as your app would (then grep again)\n"
        f"  curl -s -X POST {proxy}{UPLOAD_PATHS[0]} -d '{{\"items\": []}}'\n"
        f"      upload through the signing proxy, unsigned: the answer's ingestionId is\n"
        f"      tracked at once (source proxy) and turns DONE in ~5 s (the demo API throttles\n"
        f"      and fails now and then, as the real one does: on a 429 or 5xx, run it again)\n"
        f"  {report_example(report_config, command)}\n"
        f"      {REPORT_EXAMPLE_ID}'s processing report, once it is FATAL (~10 s)\n"
        f"Stop with Ctrl-C.\n",
        flush=True,
    )


async def run_demo(port: int | None = None) -> None:
    """Start the simulator, then serve the exporter until SIGTERM/SIGINT: built by
    `runtime.build` as from a config file, with the simulator's test key to sign with."""
    simulator = Simulator(rate_limit=SIMULATOR_RATE_LIMIT, auth="sigv4", error_rate=0.05)
    simulator.add_uploads([*demo_uploads(), REGISTER_EXAMPLE])
    sim_runner = web.AppRunner(create_simulator_app(simulator), access_log=None)
    await sim_runner.setup()
    scratch = Path(tempfile.mkdtemp(prefix="catalog-upload-exporter-demo-"))
    try:
        sim_site = web.TCPSite(sim_runner, "127.0.0.1", 0)
        await sim_site.start()
        sim_port = sim_runner.addresses[0][1]
        sim_url = f"http://127.0.0.1:{sim_port}"
        report_config = write_report_config(sim_url, scratch)
        config = demo_config(sim_url, DEFAULT_PORT if port is None else port)
        runtime = build(
            config,
            auth_factory=_simulator_auth,
            on_listening=partial(_announce, report_config=report_config),
        )
        await runtime.run()
    finally:
        await sim_runner.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
