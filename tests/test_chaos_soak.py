"""Chaos soak: thousands of uploads progress while the API misbehaves in every way it can.

A real exporter process polls the simulator over loopback while the simulator injects 429s
(with and without Retry-After), 500/502/503 (JSON and HTML), hangs, connection resets,
truncated JSON, multi-megabyte bodies, byte-a-second drips and latency spikes. Half the ids
come from the config, half are registered through the admin API during the faults, and some
of those are deleted again. Then the faults stop and the exporter must converge:

- every upload shows the simulator's final status, no id is missing, no deleted id has a
  series left;
- the exporter's request and error counters agree exactly with the simulator's request log;
- its RSS did not keep growing, `/metrics` answered within 1 s throughout;
- the token and the report links' signatures appear nowhere it printed or served;
- it never crashed, and SIGTERM ends it with status 0.

CI runs the bounded form (`SOAK_UPLOADS=2000`, `SOAK_FAULT_SECONDS=40`); the long form is
`SOAK_UPLOADS=5000 SOAK_FAULT_SECONDS=600 .venv/bin/pytest -m soak -s` (DEVELOPERS.md).
The summary table is printed (`-s` shows it) and, with `SOAK_REPORT=path`, written as JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from exporter.simulator import Fault, FaultKind, SimulatedUpload, Simulator, Step
from tests.conftest import free_port, launch_exporter, parse_exposition, wait_for

pytestmark = [pytest.mark.soak, pytest.mark.slow]

UPLOADS = int(os.environ.get("SOAK_UPLOADS", "2000"))
FAULT_SECONDS = float(os.environ.get("SOAK_FAULT_SECONDS", "40"))
SEED = int(os.environ.get("SOAK_SEED", "20261127"))
REPORT = os.environ.get("SOAK_REPORT", "")

TOKEN = "soak-token-7c1e-SECRET-never-print"
LINK_SIGNATURE_MARKER = "X-Amz-Signature"
TIMEOUT_SECONDS = 1.0
#: An answer that took the simulator this long may have reached a client that had given up.
LATE_ANSWER_SECONDS = 0.6
CONVERGE_SECONDS = 180.0
SCRAPE_EVERY = 0.5

#: (fault, share of requests) during the fault phase: about a quarter of all requests.
CHAOS: list[tuple[Fault, float]] = [
    (Fault(FaultKind.THROTTLE, retry_after=1, label="throttle_retry_after"), 0.003),
    (Fault(FaultKind.THROTTLE, key="errorMsg", label="throttle"), 0.007),
    (Fault(FaultKind.SERVER_ERROR_JSON, label="500_json"), 0.03),
    (Fault(FaultKind.SERVER_ERROR_HTML, status=502, label="502_html"), 0.02),
    (Fault(FaultKind.SERVER_ERROR_HTML, status=503, label="503_html"), 0.02),
    (Fault(FaultKind.HANG, seconds=30), 0.01),
    (Fault(FaultKind.RESET), 0.03),
    (Fault(FaultKind.MALFORMED_JSON, label="truncated_json"), 0.03),
    (Fault(FaultKind.BIG_BODY, size=3 * 1024 * 1024, label="big_body_3mb"), 0.005),
    (Fault(FaultKind.DRIP, seconds=0.05), 0.005),
    (Fault(FaultKind.LATENCY, seconds=0.3, label="latency_0.3s"), 0.05),
]


def script_for(rng: random.Random) -> list[Step]:
    """INQUEUE, INPROGRESS, then a final status within the fault phase (or never: 10%)."""
    queued = rng.uniform(0.5, FAULT_SECONDS * 0.3)
    working = rng.uniform(0.5, FAULT_SECONDS * 0.5)
    end = rng.choices(["DONE", "FATAL", "CANCELLED", "forever", "list"], [60, 15, 10, 10, 5])[0]
    if end == "forever":
        return [("INQUEUE", queued), ("INPROGRESS", math.inf)]
    if end == "list":  # the spec also shows processingStatus as a list
        return [(["INQUEUE"], queued), (["INPROGRESS"], working), (["FATAL"], math.inf)]
    return [("INQUEUE", queued), ("INPROGRESS", working), (end, math.inf)]


def upload_ids(n: int) -> list[str]:
    """Mostly plain ids, some hostile but valid (quotes, backslashes, unicode, spaces)."""
    ids = []
    for i in range(n):
        if i % 50 == 7:
            ids.append(f'soak "{i}" \\ ü/ß {{x}}')
        else:
            ids.append(f"soak-{i:06d}")
    return ids


@dataclass
class Watch:
    """What a thread scraping /metrics every SCRAPE_EVERY seconds saw, and the RSS."""

    url: str
    pid: int
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(SCRAPE_EVERY):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:  # noqa: S310
                    response.read()
                self.latencies.append(time.perf_counter() - started)
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.rss_kib.append(rss_kib(self.pid))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def per_upload_series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {
        dict(labels)["ingestion_id"] for (_, labels) in samples if "ingestion_id" in dict(labels)
    }


def hot_status(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, str]:
    return {
        dict(labels)["ingestion_id"]: dict(labels)["status"]
        for (name, labels), v in samples.items()
        if name == "catalog_upload_status" and v == 1.0
    }


def expected_status(sim: Simulator, ingestion_id: str) -> str:
    status = sim.current(ingestion_id)[0]
    return status[0] if isinstance(status, list) else status


@pytest.fixture
def exporter_process(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """Where the exporter's config goes, and its process once started (stopped at the end)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield tmp_path, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_exporter_converges_after_a_chaos_soak_with_nothing_lost_or_leaked(
    serve_simulator, exporter_process
) -> None:
    directory, procs = exporter_process
    rng = random.Random(SEED)
    sim = Simulator(rate_limit=None, auth="bearer", tokens=[TOKEN], seed=SEED)
    ids = upload_ids(UPLOADS)
    sim.add_uploads(SimulatedUpload(i, script_for(rng)) for i in ids)
    base_url = await serve_simulator(sim)
    config_ids, api_ids = ids[: UPLOADS // 2], ids[UPLOADS // 2 :]
    deleted = set(rng.sample(api_ids, len(api_ids) // 20))

    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    metrics_port, admin_port = free_port(), free_port()
    config = {
        "api": {
            "base_url": base_url,
            "auth": {"type": "bearer", "token_file": str(token_file)},
            "timeout_seconds": TIMEOUT_SECONDS,
            "max_requests_per_second": 500,
            "max_concurrency": 32,
        },
        "polling": {
            "interval_seconds": 2,
            "initial_backoff_seconds": 0.2,
            "max_backoff_seconds": 4,
        },
        "ingestions": {"ids": config_ids, "labels": ["team"]},
        "server": {"host": "127.0.0.1", "port": metrics_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "state": {"path": str(directory / "state.json")},
        "logging": {"level": "debug"},
        "reload": {"watch_interval_seconds": 0},
    }
    proc, log_path = launch_exporter(directory, config)
    procs.append(proc)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    api_url = f"http://127.0.0.1:{admin_port}/api/v1/ingestions"

    async with aiohttp.ClientSession() as session:
        await wait_ready(session, f"http://127.0.0.1:{metrics_port}/readyz", proc)
        watch = Watch(metrics_url, proc.pid)
        watcher = threading.Thread(target=watch.run, daemon=True)
        watcher.start()
        started = time.monotonic()
        sim.set_chaos(CHAOS)

        # During the faults: register the other half through the admin API, delete some.
        gate = asyncio.Semaphore(16)

        async def register(ingestion_id: str) -> None:
            async with (
                gate,
                session.post(
                    api_url, json={"ingestionId": ingestion_id, "labels": {"team": "soak"}}
                ) as response,
            ):
                assert response.status == 201, await response.text()

        await asyncio.gather(*(register(i) for i in api_ids))
        registered_after = time.monotonic() - started
        # Wall-clock waits that stay: the soak is faults for FAULT_SECONDS of real time (its
        # long form is the same test with a bigger number), and the deletions come a while
        # into it, so that they race polls that are retrying through faults.
        await asyncio.sleep(min(5.0, FAULT_SECONDS / 4))
        for ingestion_id in sorted(deleted):
            async with session.delete(f"{api_url}/{quote(ingestion_id, safe='')}") as response:
                assert response.status == 204, await response.text()
        await asyncio.sleep(max(0.0, FAULT_SECONDS - (time.monotonic() - started)))

        # The faults stop; whatever never finished finishes now.
        sim.clear_faults()
        faults_ended = time.monotonic()
        rss_during_faults = list(watch.rss_kib)
        for ingestion_id in ids:
            if expected_status(sim, ingestion_id) in {"INQUEUE", "INPROGRESS"}:
                sim.set_status(ingestion_id, "DONE")
        expected = {i: expected_status(sim, i) for i in ids if i not in deleted}

        shown: dict[str, str] = {}
        series_ids: set[str] = set()
        # Ends on evidence (every id shows its final status); CONVERGE_SECONDS only bounds a
        # failure, and converged_after is reported, not asserted.
        while time.monotonic() - faults_ended < CONVERGE_SECONDS:
            assert proc.poll() is None, "the exporter died"
            samples = await scrape(session, metrics_url)
            shown, series_ids = hot_status(samples), per_upload_series(samples)
            if all(shown.get(i) == s for i, s in expected.items()) and not series_ids & deleted:
                break
            await asyncio.sleep(1)
        converged_after = time.monotonic() - faults_ended

        # Everything is terminal: polling stops. Wait for the last request to end, then make
        # sure none came after it (the scrapes below take long enough for a late one to show).
        await wait_quiet(sim)
        logged = len(sim.requests)
        watch.stop.set()
        watcher.join(timeout=10)
        samples = await scrape(session, metrics_url)
        metrics_text = await fetch_text(session, metrics_url)
        async with session.get(f"{api_url}?limit=10000") as response:  # one page: all of them
            listing = await response.text()
        assert (len(sim.requests), sim.in_flight) == (logged, 0), "a request after the last"

    proc.send_signal(signal.SIGTERM)
    exit_code = proc.wait(timeout=TIMEOUT_SECONDS + 15)
    log_text = log_path.read_text(errors="replace")

    mismatched = sorted(i for i, s in expected.items() if i in shown and shown[i] != s)
    lost = sorted(i for i in expected if i not in series_ids)
    leftover = sorted(series_ids & deleted)
    counters, late_races = counter_disagreements(sim, samples)
    leaks = [
        f"{secret!r} in {where}"
        for secret in (TOKEN, LINK_SIGNATURE_MARKER)
        for where, text in (("logs", log_text), ("/metrics", metrics_text), ("admin", listing))
        if secret in text
    ]
    crashes = int(exit_code != 0) + log_text.count("Traceback")
    summary = soak_summary(
        sim, watch, rss_during_faults, registered_after, converged_after,
        crashes=crashes, mismatched=mismatched, lost=lost, leftover=leftover,
        counter_disagreements=counters, timeout_races=late_races, leaks=leaks,
    )  # fmt: skip
    print_summary(summary)
    if REPORT:
        Path(REPORT).write_text(json.dumps(summary, indent=2))

    assert crashes == 0, f"exit code {exit_code}, tracebacks: {log_text.count('Traceback')}"
    assert not lost, f"{len(lost)} ids missing, e.g. {lost[:3]}"
    assert not mismatched, (
        f"{len(mismatched)} wrong, e.g. {[(i, shown[i], expected[i]) for i in mismatched[:3]]}"
    )
    assert not leftover, f"series left for deleted ids: {leftover[:3]}"
    assert not counters, "counters disagree with the simulator's log:\n" + "\n".join(counters)
    assert not leaks, leaks
    assert not watch.failures, watch.failures[:3]
    # A wall-clock bound that stays: a scrape's latency under load is the property, and it
    # must stay well inside Prometheus's scrape timeout (10 s by default) with room to spare.
    assert max(watch.latencies) < 1.0, f"slowest scrape {max(watch.latencies):.3f} s"
    assert summary["injected"]["total"] >= 200, "too few faults to mean anything"
    assert rss_did_not_keep_growing(rss_during_faults), summary["rss_mib"]


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "exporter exited during start-up"
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail("exporter not ready within 30 s")


async def fetch_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def scrape(
    session: aiohttp.ClientSession, url: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parsed in a thread: parsing blocks for a while, and this loop serves the simulator."""
    return await asyncio.to_thread(parse_exposition, await fetch_text(session, url))


async def wait_quiet(sim: Simulator, at_most: float = 60.0) -> None:
    """Until the simulator handles no request: every one it received is in its log. Called
    once every upload is terminal, when the exporter polls no more (a request it gave up on
    still ends at the simulator, which notices its client gone). `at_most` only bounds a
    failure."""

    async def none_in_flight() -> bool:
        return sim.in_flight == 0

    await wait_for(none_in_flight, timeout=at_most)


def counter_disagreements(
    sim: Simulator, samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
) -> tuple[list[str], int]:
    """Each exporter counter against what the simulator's log says it must be.

    One race is inherent: an answer the simulator sent just as the client's timeout fired is
    logged answered but counted as a timeout. Such a request took the simulator most of the
    timeout; those ("late" answers) bound how many requests may have moved from their code
    to "error" and from their kind to "timeout". Returns (problems, requests that moved).
    """

    def metric(name: str, **labels: str) -> int:
        return int(samples.get((name, frozenset(labels.items())), 0.0))

    log = sim.requests
    unanswered = [r for r in log if r.status is None]
    late = Counter(
        str(r.status)
        for r in log
        if r.status is not None
        and r.received is not None
        and r.time - r.received >= LATE_ANSWER_SECONDS
    )
    # A drip sends its status line before it stalls: the exporter counts its code.
    dripped = sum(1 for r in unanswered if r.fault == "drip")
    by_code = Counter(str(r.status) for r in log if r.status is not None)
    by_code["200"] += dripped
    by_code["error"] = len(unanswered) - dripped
    exported = Counter(
        {
            dict(labels)["code"]: int(v)
            for (name, labels), v in samples.items()
            if name == "catalog_api_requests_total"
        }
    )
    problems = []
    moved = exported["error"] - by_code["error"]
    if not 0 <= moved <= sum(late.values()):
        problems.append(
            f"{exported['error']} 'error' requests, simulator log says {by_code['error']}"
        )
    for code in sorted(set(by_code) | set(exported) - {"error"}):
        if not 0 <= by_code[code] - exported[code] <= late[code]:
            problems.append(
                f"requests_total{{code={code!r}}} = {exported[code]}, log: {by_code[code]}"
            )
    if sum(by_code.values()) != sum(exported.values()):
        problems.append(f"{sum(exported.values())} requests counted, log has {len(log)}")
    labels = Counter(r.fault for r in log)
    expect = {
        ("catalog_api_throttled_total", ""): (by_code["429"], late["429"]),
        ("catalog_api_errors_total", "server_error"): (
            sum(by_code[c] for c in ("500", "502", "503")),
            sum(late[c] for c in ("500", "502", "503")),
        ),
        ("catalog_api_errors_total", "connection"): (labels["reset"], 0),
        ("catalog_api_errors_total", "malformed_response"): (
            labels["truncated_json"] + labels["big_body_3mb"],
            late["200"],
        ),
    }
    for (name, kind), (want, slack) in expect.items():
        got = metric(name, kind=kind) if kind else metric(name)
        if not 0 <= want - got <= slack:
            problems.append(f"{name}{{kind={kind!r}}} = {got}, simulator log says {want}")
    timeouts = metric("catalog_api_errors_total", kind="timeout")
    if timeouts != len(unanswered) - labels["reset"] + moved:
        problems.append(
            f"timeouts = {timeouts}, log says {len(unanswered) - labels['reset']} + {moved} late"
        )
    return problems, moved


def rss_did_not_keep_growing(rss: list[int]) -> bool:
    """The last third of the fault phase is not above the first third (after a warm-up)."""
    settled = rss[len(rss) // 5 :]
    if len(settled) < 6:
        return True
    third = len(settled) // 3
    first, last = statistics.median(settled[:third]), statistics.median(settled[-third:])
    return last <= first * 1.2 + 8 * 1024


def soak_summary(
    sim: Simulator,
    watch: Watch,
    rss: list[int],
    registered_after: float,
    converged_after: float,
    **outcome: object,
) -> dict[str, object]:
    injected = Counter(r.fault for r in sim.requests if r.fault is not None)
    latencies = sorted(watch.latencies)
    return {
        "uploads": UPLOADS,
        "fault_seconds": FAULT_SECONDS,
        "seed": SEED,
        "requests": len(sim.requests),
        "injected": {**dict(sorted(injected.items())), "total": sum(injected.values())},
        "registered_via_api_within_s": round(registered_after, 1),
        "converged_within_s": round(converged_after, 1),
        "scrapes": len(latencies),
        "scrape_ms": {
            "median": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)
            if latencies
            else None,
            "max": round(1000 * latencies[-1], 1) if latencies else None,
        },
        "scrape_failures": len(watch.failures),
        "rss_mib": {
            "first": round(rss[len(rss) // 5] / 1024, 1) if rss else None,
            "max": round(max(rss) / 1024, 1) if rss else None,
            "last": round(rss[-1] / 1024, 1) if rss else None,
        },
        **{k: (len(v) if isinstance(v, list) else v) for k, v in outcome.items()},
    }


def print_summary(summary: dict[str, object]) -> None:
    print("\nchaos soak summary")
    print(f"{'':2}{'what':<34}{'value'}")
    for key, item in summary.items():
        if isinstance(item, dict):
            for sub, v in item.items():
                print(f"{'':2}{key + '.' + sub:<34}{v}")
        else:
            print(f"{'':2}{key:<34}{item}")
