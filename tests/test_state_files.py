"""Hostile things at `state.path`, against the real exporter process.

A directory, a FIFO or a file the process may not read is left exactly as it is: the exporter
runs without persistence, says so in a metric and an error log line, and answers admin writes
503. A file with a few bad entries keeps the good ones and counts the others.

The unreadable file: the tests run as root, and root reads a mode-000 file anyway (the
CAP_DAC_OVERRIDE capability). So the exporter is started under `setpriv` with that capability
and CAP_DAC_READ_SEARCH dropped from its bounding set: still uid 0, but now open() fails with a
real EACCES, as it would for an unprivileged user. As a non-root user, chmod alone does it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.state import APPLICATION_ID, SCHEMA_VERSION
from tests.conftest import free_port, launch_exporter, parse_exposition, value

AVAILABLE = "catalog_exporter_state_persistence_available"
SKIPPED = "catalog_exporter_state_skipped_entries_total"
LOAD_ERRORS = "catalog_exporter_state_load_errors_total"
REOPENS = "catalog_exporter_state_reopens_total"


@dataclass
class Running:
    """An exporter process, its listeners and its log file."""

    proc: subprocess.Popen[bytes]
    metrics: str
    admin: str
    log: Path

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"{self.metrics}/metrics", timeout=5) as answer:  # noqa: S310
            return parse_exposition(answer.read().decode())

    def post(self, ingestion_id: str, timeout: float = 5) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(  # noqa: S310 - loopback only
            f"{self.admin}/api/v1/ingestions",
            data=json.dumps({"ingestionId": ingestion_id}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def tracked(self) -> set[str]:
        url = f"{self.admin}/api/v1/ingestions"
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310
            return {view["ingestionId"] for view in json.load(answer)["ingestions"]}

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


Start = Callable[..., Running]


@pytest.fixture
def exporter_at(tmp_path: Path) -> Iterator[Start]:
    """Start the exporter with `state.path` at the given path; stopped with SIGTERM after."""
    started: list[Running] = []

    def start(state: Path, *, prefix: list[str] | None = None) -> Running:
        metrics_port, admin_port = free_port(), free_port()
        config = {
            "api": {"base_url": f"http://127.0.0.1:{free_port()}", "auth": {"type": "none"}},
            "ingestions": {"ids": ["from-config"]},
            "server": {"host": "127.0.0.1", "port": metrics_port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "state": {"path": str(state), "debounce_seconds": 0},
            "reload": {"watch_interval_seconds": 0},
        }
        proc, log = launch_exporter(tmp_path, config, prefix=prefix or ())
        running = Running(
            proc, f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{admin_port}", log
        )
        started.append(running)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"exporter exited {proc.returncode}: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{running.metrics}/readyz", timeout=1):  # noqa: S310
                    break
            except OSError:
                assert time.monotonic() < deadline, "exporter not ready within 30 s"
                time.sleep(0.05)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.terminate()
            assert running.proc.wait(timeout=20) == 0
        assert "Traceback" not in running.log.read_text()


def assert_runs_without_persistence(running: Running, state: Path) -> None:
    """The metric, the error log, the 503 and the config's ids: all say "no persistence"."""
    assert value(running.samples(), AVAILABLE) == 0
    status, body = running.post("not-durable")
    assert status == 503 and body["error"] == "state_unavailable"
    assert running.tracked() == {"from-config"}  # polling goes on; the refused id left no trace
    events = [e for e in running.log_events() if e.get("event") == "state_persistence_unavailable"]
    assert len(events) == 1 and events[0]["level"] == "error"
    assert events[0]["path"] == str(state)
    assert not list(state.parent.glob(f"{state.name}.corrupt-*"))


def stop(running: Running) -> None:
    """SIGTERM, and the exit code is 0 (the final write, if any, happened by then)."""
    running.proc.terminate()
    assert running.proc.wait(timeout=20) == 0


def test_a_directory_at_the_state_path_is_left_alone_and_admin_writes_answer_503(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """No exit 2 and no crash loop: the exporter runs without persistence; the directory stays."""
    state = tmp_path / "state.json"
    state.mkdir()
    (state / "inside").write_text("kept")

    running = exporter_at(state)
    assert_runs_without_persistence(running, state)
    stop(running)

    assert state.is_dir() and [p.name for p in state.iterdir()] == ["inside"]


def test_a_fifo_at_the_state_path_does_not_hang_the_start(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """A FIFO nobody writes to is not read (that would block for ever) and not replaced."""
    state = tmp_path / "state.json"
    os.mkfifo(state)

    running = exporter_at(state)
    assert_runs_without_persistence(running, state)
    stop(running)

    assert state.is_fifo()


def test_an_unreadable_state_file_is_neither_moved_nor_overwritten(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """EACCES on open: the registrations in the file are not dropped, nothing is written."""
    state = tmp_path / "state.json"
    content = json.dumps(
        {
            "version": 1,
            "written_at": 1.0,
            "uploads": [
                {
                    "ingestion_id": "kept-in-file",
                    "sources": ["api"],
                    "labels": {},
                    "status": "INQUEUE",
                    "first_seen": 1.0,
                    "status_changed": 1.0,
                }
            ],
            "retired": {},
        }
    ).encode()
    state.write_bytes(content)
    state.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to take root's DAC override"
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]

    running = exporter_at(state, prefix=prefix)
    assert_runs_without_persistence(running, state)
    stop(running)

    state.chmod(0o600)
    assert state.read_bytes() == content


def test_bad_entries_are_skipped_and_counted_and_the_good_ones_tracked(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """One malformed record costs that record only; the file is not moved aside."""
    good = {
        "ingestion_id": "good",
        "sources": ["api"],
        "labels": {},
        "status": "INQUEUE",
        "first_seen": 1.0,
        "status_changed": 1.0,
    }
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "written_at": 1.0,
                "uploads": [{**good, "ingestion_id": "bad", "first_seen": "yesterday"}, good],
                "retired": {"also-bad": "never"},
            }
        )
    )

    running = exporter_at(state)

    assert running.tracked() == {"good", "from-config"}
    samples = running.samples()
    assert value(samples, SKIPPED) == 2 and value(samples, AVAILABLE) == 1
    assert running.post("durable")[0] == 201
    assert not list(tmp_path.glob("state.json.corrupt-*"))
    stop(running)


def test_a_database_of_ours_without_its_unique_constraint_is_moved_aside_and_writes_work(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """application_id and version right, UNIQUE missing: set aside at start, not accepted
    to fail every commit afterwards (which answered every admin POST 503)."""
    state = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(state, isolation_level=None)) as db:
        db.executescript(
            "CREATE TABLE uploads (ingestion_id TEXT NOT NULL, sources TEXT NOT NULL, "
            "labels TEXT NOT NULL, status TEXT NOT NULL, first_seen REAL NOT NULL, "
            "status_changed REAL NOT NULL, last_success REAL, terminal_at REAL, "
            "report_available INTEGER NOT NULL, queue_observed INTEGER NOT NULL, "
            "released INTEGER NOT NULL);"
            "CREATE TABLE retired (ingestion_id TEXT PRIMARY KEY, retired_at REAL NOT NULL) "
            f"WITHOUT ROWID; PRAGMA application_id = {APPLICATION_ID}; "
            f"PRAGMA user_version = {SCHEMA_VERSION};"
        )

    running = exporter_at(state)

    assert running.post("durable")[0] == 201
    samples = running.samples()
    assert value(samples, AVAILABLE) == 1 and value(samples, LOAD_ERRORS) == 1
    assert len(list(tmp_path.glob("state.db.corrupt-*"))) == 1
    stop(running)


@pytest.mark.parametrize("with_wal", [False, True], ids=["database", "database and WAL"])
def test_a_state_file_deleted_while_running_loses_no_acknowledged_id(
    exporter_at: Start,
    tmp_path: Path,
    with_wal: bool,
) -> None:
    """5 ids, the file deleted, 20 more ids, SIGKILL: the next start tracks all 25."""
    state = tmp_path / "state.db"
    running = exporter_at(state)
    acknowledged = {f"before-{n}" for n in range(5)}
    for ingestion_id in sorted(acknowledged):
        assert running.post(ingestion_id)[0] == 201

    for name in (state, Path(f"{state}-wal"), Path(f"{state}-shm"))[: 3 if with_wal else 1]:
        name.unlink()
    after = {f"after-{n}" for n in range(20)}
    statuses = {ingestion_id: running.post(ingestion_id)[0] for ingestion_id in sorted(after)}
    acknowledged |= {i for i, status in statuses.items() if status == 201}
    reopens = value(running.samples(), REOPENS)
    running.proc.kill()
    running.proc.wait(timeout=10)

    again = exporter_at(state)

    assert acknowledged == after | {f"before-{n}" for n in range(5)}  # none got a 503 either
    assert again.tracked() >= acknowledged
    assert reopens == 1
    stop(again)


@pytest.mark.slow
def test_failed_writes_make_persistence_available_0_until_a_write_succeeds(
    exporter_at: Start,
    tmp_path: Path,
) -> None:
    """While commits fail (here: another process holds the write lock) admin writes get 503
    and the gauge says 0; it says 1 again once a write succeeds."""
    state = tmp_path / "state.db"
    running = exporter_at(state)
    lock = sqlite3.connect(state, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        status, body = running.post("refused", timeout=30)  # SQLite waits 5 s for the lock
        assert status == 503 and body["error"] == "state_unavailable"
        assert value(running.samples(), AVAILABLE) == 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    assert running.post("accepted")[0] == 201
    assert value(running.samples(), AVAILABLE) == 1
    stop(running)
