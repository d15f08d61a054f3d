"""End to end: simulator → exporter → real Prometheus (rules loaded) → real Alertmanager → webhook.

Prometheus scrapes the exporter every second with the shipped rules file. So that an alert
can fire within a test, the rules are loaded with their time scales shrunk: every `for:`
becomes 3 s (longer than the first scrape takes) and every range selector 5 s. Expressions,
labels and routing are otherwise the shipped ones.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.simulator import Fault
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    free_port,
    launch,
    require_tool,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "catalog-upload-exporter.rules.yml"
JOB = "catalog-upload-exporter"

pytestmark = pytest.mark.slow


def shrink_time_scales(rules_text: str) -> str:
    """The shipped rules with `for:` set to 3 s and range selectors to 5 s."""
    document = yaml.safe_load(rules_text)
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "3s"
            rule["expr"] = re.sub(r"\[\d+[smhd]\]", "[5s]", rule["expr"])
    return yaml.safe_dump(document)


@dataclass
class Webhook:
    """Alertmanager's webhook receiver: every alert notification it was sent."""

    notifications: list[dict[str, Any]] = field(default_factory=list)

    def firing(self) -> list[dict[str, str]]:
        return [
            alert["labels"]
            for notification in self.notifications
            for alert in notification["alerts"]
            if alert["status"] == "firing"
        ]


@dataclass
class Stack:
    """A running Prometheus + Alertmanager pair and the webhook they notify."""

    prometheus_url: str
    webhook: Webhook

    async def query(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.prometheus_url + path) as response,
        ):
            assert response.status == 200, await response.text()
            return (await response.json())["data"]


class Processes:
    """Child processes that are always stopped, whatever the test does."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        proc = launch(args, log)
        self._procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async def ready() -> bool:
        assert proc.poll() is None, f"{url} exited:\n{log.read_text()}"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=30, interval=0.2)


StackFactory = Callable[[str], Awaitable[Stack]]


@pytest.fixture
async def start_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """`stack = await start_stack(exporter_url)`: webhook, Alertmanager and Prometheus."""
    processes = Processes()
    servers: list[TestServer] = []

    async def start(exporter_url: str) -> Stack:
        webhook = Webhook()

        async def receive(request: web.Request) -> web.Response:
            webhook.notifications.append(await request.json())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/alerts", receive)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)

        am_port, prom_port = free_port(), free_port()
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "webhook",
                        "group_by": ["alertname", "ingestion_id", "instance"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "webhook",
                            "webhook_configs": [{"url": str(server.make_url("/alerts"))}],
                        }
                    ],
                }
            )
        )
        am_log = tmp_path / "alertmanager.log"
        am = processes.start(
            [
                require_tool("prometheus-alertmanager"),
                f"--config.file={am_config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            am_log,
        )
        await wait_ready(f"http://127.0.0.1:{am_port}/-/ready", am, am_log)

        rules = tmp_path / "rules.yml"
        rules.write_text(shrink_time_scales(RULES.read_text()))
        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "alerting": {
                        "alertmanagers": [
                            {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
                        ]
                    },
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "static_configs": [{"targets": [exporter_url.split("://")[1]]}],
                        }
                    ],
                }
            )
        )
        prom_log = tmp_path / "prometheus.log"
        prom = processes.start(
            [
                require_tool("prometheus"),
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            prom_log,
        )
        prometheus_url = f"http://127.0.0.1:{prom_port}"
        await wait_ready(f"{prometheus_url}/-/ready", prom, prom_log)
        return Stack(prometheus_url, webhook)

    try:
        yield start
    finally:
        processes.stop_all()
        for server in servers:
            await server.close()


async def _exporter_url(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> tuple[Any, str]:
    """A simulator with three healthy uploads and an exporter polling them; its base URL."""
    sim, url = await start_simulator()
    sim.add_upload("up-ok", [("DONE", 0)])
    sim.add_upload("up-busy", [("INPROGRESS", 0)])
    sim.add_upload("up-doomed", [("INQUEUE", 0)])
    running = await start_exporter(fast_config(url, ["up-ok", "up-busy", "up-doomed"]))
    return sim, running.url.rstrip("/")


async def _healthy_scrapes(stack: Stack, count: int) -> bool:
    """Whether Prometheus has scraped the exporter successfully at least `count` times."""
    result = (await stack.query("/api/v1/query?query=sum_over_time(up[1m])"))["result"]
    return bool(result) and float(result[0]["value"][1]) >= count


async def test_fatal_upload_reaches_the_webhook_labelled_with_its_id(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, start_stack: StackFactory
) -> None:
    """Driving one upload to FATAL sends CatalogUploadFatal for that ingestion_id to the webhook."""
    sim, exporter_url = await _exporter_url(start_simulator, start_exporter)
    stack = await start_stack(exporter_url)
    await wait_for(lambda: _healthy_scrapes(stack, 3), timeout=30, interval=0.5)
    assert stack.webhook.firing() == []
    sim.set_status("up-doomed", "FATAL")

    async def paged() -> bool:
        return any(a["alertname"] == "CatalogUploadFatal" for a in stack.webhook.firing())

    await wait_for(paged, timeout=45, interval=0.5)
    fatal = [a for a in stack.webhook.firing() if a["alertname"] == "CatalogUploadFatal"]
    assert {a["ingestion_id"] for a in fatal} == {"up-doomed"}
    assert fatal[0]["severity"] == "page"
    assert fatal[0]["job"] == JOB


async def test_hard_throttling_fires_the_throttling_alert(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, start_stack: StackFactory
) -> None:
    """When every request is answered 429, CatalogApiThrottled reaches the webhook."""
    sim, exporter_url = await _exporter_url(start_simulator, start_exporter)
    sim.inject(Fault("throttle"))
    stack = await start_stack(exporter_url)

    async def throttled() -> bool:
        return any(a["alertname"] == "CatalogApiThrottled" for a in stack.webhook.firing())

    await wait_for(throttled, timeout=45, interval=0.5)
    assert "CatalogUploadFatal" not in {a["alertname"] for a in stack.webhook.firing()}


async def test_a_healthy_run_fires_nothing(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, start_stack: StackFactory
) -> None:
    """With the rules evaluated for a while on a healthy exporter, no alert is pending or firing."""
    _, exporter_url = await _exporter_url(start_simulator, start_exporter)
    stack = await start_stack(exporter_url)
    started = time.monotonic()

    async def rules_evaluated() -> bool:
        groups = (await stack.query("/api/v1/rules"))["groups"]
        rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
        shipped = yaml.safe_load(RULES.read_text())["groups"]
        expected = sum(1 for g in shipped for r in g["rules"] if "alert" in r)
        return len(rules) == expected and all(
            r["health"] == "ok" and r.get("lastEvaluation", "").startswith("20") for r in rules
        )

    async def scraped() -> bool:
        targets = (await stack.query("/api/v1/targets"))["activeTargets"]
        return [t["health"] for t in targets] == ["up"]

    await wait_for(rules_evaluated, timeout=30, interval=0.5)
    await wait_for(scraped, timeout=30, interval=0.5)
    # Long enough for every shrunk `for:` (3 s) and range window (5 s) to have passed.
    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - started)))
    assert (await stack.query("/api/v1/alerts"))["alerts"] == []
    assert stack.webhook.firing() == []
