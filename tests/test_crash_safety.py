"""SIGKILL at random moments never loses an acknowledged registration nor corrupts the state."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, launch, launch_exporter

ROUNDS = 6


def post(url: str, ingestion_id: str) -> int:
    request = urllib.request.Request(  # noqa: S310 - loopback only
        url,
        data=json.dumps({"ingestionId": ingestion_id}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "exporter exited during start-up"
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{url} not up within {timeout} s")


def start_exporter(config: Path) -> subprocess.Popen[bytes]:
    proc, _ = launch_exporter(config.parent, config)  # each start logs to a file of its own
    return proc


def tracked_ids(api: str) -> set[str]:
    """Every id the admin API lists, page after page."""
    ids: set[str] = set()
    cursor = ""
    while True:
        url = f"{api}?limit=10000" + (f"&cursor={cursor}" if cursor else "")
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            page = json.load(response)
        ids.update(view["ingestionId"] for view in page["ingestions"])
        cursor = page["nextCursor"]
        if cursor is None:
            return ids


@pytest.fixture
def simulator_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = launch(
        [sys.executable, "-m", "exporter.simulator", "--port", str(port), "--rate-limit", "0"],
        tmp_path / "simulator.log",
    )
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_acknowledged_ids_survive_sigkill_and_restart(simulator_url: str, tmp_path: Path) -> None:
    """Register ids over HTTP, SIGKILL at a random moment, restart: every 2xx id is back."""
    rng = random.Random(20261127)
    state = tmp_path / "state.json"
    admin_port, metrics_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api: {{base_url: '{simulator_url}', auth: {{type: none}}, max_requests_per_second: 50}}\n"
        "polling: {interval_seconds: 1}\n"
        f"server: {{host: 127.0.0.1, port: {metrics_port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"state: {{path: '{state}', debounce_seconds: 0.2}}\n"
        "reload: {watch_interval_seconds: 0}\n"
    )
    api = f"http://127.0.0.1:{admin_port}/api/v1/ingestions"
    acknowledged: set[str] = set()
    counter = 0
    for round_number in range(ROUNDS):
        proc = start_exporter(config)
        try:
            wait_up(f"http://127.0.0.1:{admin_port}/healthz", proc)
            lost = acknowledged - tracked_ids(api)
            assert not lost, f"round {round_number}: acknowledged ids lost: {sorted(lost)[:5]}"
            assert not list(tmp_path.glob("state.json.corrupt-*")), "state file was corrupt"

            stop = threading.Event()

            def register_until_stopped(stop: threading.Event = stop) -> None:
                nonlocal counter
                while not stop.is_set():
                    counter += 1
                    ingestion_id = f"crash-{counter:06d}"
                    try:
                        status = post(api, ingestion_id)
                    except OSError:
                        return  # the exporter died mid-request: not acknowledged
                    if 200 <= status < 300:
                        acknowledged.add(ingestion_id)

            workers = [threading.Thread(target=register_until_stopped) for _ in range(3)]
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(0.1, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            for worker in workers:
                worker.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(acknowledged) > ROUNDS * 5, "too few registrations to mean anything"
    print(f"{len(acknowledged)} registrations acknowledged over {ROUNDS} SIGKILLs")
    # A last start proves the final state too.
    proc = start_exporter(config)
    try:
        wait_up(f"http://127.0.0.1:{admin_port}/healthz", proc)
        assert acknowledged <= tracked_ids(api)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
