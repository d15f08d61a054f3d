"""Shared helpers for the benchmarks: processes, ports, configs, scrapes, percentiles, /proc.

Every benchmark runs the exporter as a real process (`python -m exporter --config ...`) on
loopback, next to a simulator process or an in-process simulator, and prints figures; none
asserts a timing. Processes started here are stopped by their own pid, never by name.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUTPUT = BENCH / "output"
LOGS = OUTPUT / "logs"
PYTHON = sys.executable
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

#: Headers of a scrape that must not be compressed (aiohttp's client asks for gzip by default).
IDENTITY = {"Accept-Encoding": "identity"}
#: What Prometheus sends: it asks for gzip.
GZIP = {"Accept-Encoding": "gzip"}


# -- command line and output ---------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller and shorter (under ~60 s)")
    p.add_argument(
        "--source",
        type=Path,
        default=Path(os.environ.get("BENCH_EXPORTER_SOURCE", ROOT)),
        help="directory holding the exporter/ package to run (default: this work tree; "
        "e.g. a `git archive HEAD exporter` copy to measure the last commit)",
    )
    p.add_argument(
        "--log-level", default="info", help="exporter logging.level (default info, as deployed)"
    )
    return p


def ids(n: int) -> list[str]:
    """The ids `python -m exporter.simulator --uploads n` and `sim_server.py` know."""
    return [f"sim-{i:06d}" for i in range(1, n + 1)]


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A plain aligned table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    print(f"\n== {title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(t.rjust(w) for t, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def emit_summary(name: str, summary: Mapping[str, Any]) -> None:
    """Print the one-line JSON summary (for BENCHMARKS.md) and keep it in output/<name>.json."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"bench": name, **summary}, sort_keys=False, default=_json_default)
    (OUTPUT / f"{name}.json").write_text(line + "\n", encoding="utf-8")
    print(f"\nBENCH_JSON {line}", flush=True)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    msg = f"not JSON serialisable: {type(value).__name__}"
    raise TypeError(msg)


def note(text: str) -> None:
    """A progress line on stderr, so that stdout holds only results."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- numbers -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; with n < 100 samples p99 is
    close to the maximum, so read it as such."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats(values: Sequence[float]) -> dict[str, float]:
    """n, median, p90, p99, max and mean of `values`."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded for the JSON summary, recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


# -- /proc -----------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    msg = f"{key} not in /proc/{pid}/status"
    raise LookupError(msg)


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS), KiB."""
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size since the process started (VmHWM), KiB."""
    return _status_kib(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (threads included), seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    # After "pid (comm) ", field 3 is at index 0: utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- ports, configs ------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def exporter_config(
    path: Path,
    *,
    base_url: str,
    port: int,
    ingestion_ids: Sequence[str] = (),
    max_rps: float = 1000,
    concurrency: int = 64,
    interval: float = 1.0,
    timeout: float = 2.0,
    log_level: str = "info",
    state_path: Path | None = None,
    polling: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write an exporter config (auth none, admin off, /metrics on `port`) and return its path.

    `sections` adds or extends top-level sections (e.g. {"metrics": {"status_series": ...}})."""
    document: dict[str, Any] = {
        "api": {
            "base_url": base_url,
            "auth": {"type": "none"},
            "timeout_seconds": timeout,
            "max_requests_per_second": max_rps,
            "max_concurrency": concurrency,
        },
        "polling": {"interval_seconds": interval, **(polling or {})},
        "ingestions": {"ids": list(ingestion_ids)},
        "server": {"host": HOST, "port": port},
        "admin": {"enabled": False},
        "logging": {"level": log_level, "format": "json"},
    }
    if state_path is not None:
        document["state"] = {"path": str(state_path)}
    for name, values in (sections or {}).items():
        document.setdefault(name, {}).update(values)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(document, f, Dumper=dumper, sort_keys=False)
    return path


# -- processes -------------------------------------------------------------------------------


@dataclass
class Process:
    """A child process with its output in a log file; stopped by its own pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes(contextlib.AbstractContextManager["Processes"]):
    """Starts children and stops every one of them on exit, whatever happened."""

    children: list[Process] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start `argv`, stdout and stderr to output/logs/<name>.log."""
        LOGS.mkdir(parents=True, exist_ok=True)
        log_path = LOGS / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, popen, log_path, time.monotonic())
        self.children.append(process)
        return process

    def exporter(self, name: str, config: Path, source: Path) -> Process:
        """`python -m exporter --config config`, importing the package from `source`."""
        pythonpath = os.pathsep.join(
            p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p
        )
        return self.start(
            name,
            [PYTHON, "-m", "exporter", "--config", str(config)],
            cwd=source,
            env={"PYTHONPATH": pythonpath},
        )

    def sim_server(
        self,
        name: str,
        *,
        port: int,
        control_port: int,
        uploads: int,
        rate_limit: float = 0,
        burst: float | None = None,
    ) -> Process:
        """bench/sim_server.py: the simulator with steady uploads and a control listener."""
        argv = [
            PYTHON,
            str(BENCH / "sim_server.py"),
            "--port",
            str(port),
            "--control-port",
            str(control_port),
            "--uploads",
            str(uploads),
            "--rate-limit",
            str(rate_limit),
        ]
        if burst is not None:
            argv += ["--burst", str(burst)]
        return self.start(name, argv, cwd=ROOT)

    async def running_sim_server(self, name: str, *, uploads: int, within: float = 120.0) -> str:
        """`sim_server` on free ports, once its control listener answers; its base URL (for
        the benchmarks that need nothing else of it)."""
        port, control_port = free_port(), free_port()
        sim = self.sim_server(name, port=port, control_port=control_port, uploads=uploads)
        await wait_http(f"http://{HOST}:{control_port}/stats", within=within, process=sim)
        return f"http://{HOST}:{port}"

    def stop_all(self) -> None:
        """Stop every child, last started first."""
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        self.children.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# -- HTTP ------------------------------------------------------------------------------------


def session(**kwargs: Any) -> aiohttp.ClientSession:
    """A client session for loopback benchmarks: no decompression (bytes on the wire are
    measured), long timeout (a 100k-upload scrape of the current code takes seconds)."""
    return aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=300), **kwargs
    )


async def wait_http(
    url: str, *, within: float, process: Process | None = None, interval: float = 0.02
) -> float:
    """Wait until `url` answers 200; the monotonic time it did. Fails if `process` dies."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                msg = f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}"
                raise RuntimeError(msg)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(url, headers=IDENTITY) as r:
                    await r.read()
                    if r.status == 200:
                        return time.monotonic()
            await asyncio.sleep(interval)
    tail = f":\n{process.tail()}" if process is not None else ""
    msg = f"{url} did not answer 200 within {within} s{tail}"
    raise TimeoutError(msg)


@dataclass(frozen=True)
class Scrape:
    """One timed GET: seconds from sending to the last byte, bytes on the wire, status."""

    seconds: float
    size: int
    status: int
    body: bytes
    encoding: str = ""


async def scrape(
    s: aiohttp.ClientSession, url: str, headers: Mapping[str, str] = IDENTITY
) -> Scrape:
    """Time one GET to the last byte of its body."""
    started = time.perf_counter()
    async with s.get(url, headers=dict(headers)) as r:
        body = await r.read()
        status = r.status
        encoding = r.headers.get("Content-Encoding", "")
    return Scrape(time.perf_counter() - started, len(body), status, body, encoding)


async def get_json(url: str, method: str = "GET", payload: object = None) -> Any:
    """A small JSON exchange (the simulator's control listener)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.request(method, url, json=payload) as r,
    ):
        r.raise_for_status()
        return await r.json()


def samples(text: str, names: Iterable[str]) -> dict[str, float]:
    """Samples of the named metrics from a text exposition, keyed by the sample's full
    `name{labels}`; a line scan, so that a 60 MB exposition is read in a second."""
    prefixes = tuple(names)
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[key] = float(value)
    return found


def total(found: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    result = 0.0
    for key, value in found.items():
        base = key.split("{", 1)[0]
        if base == name and all(w in key for w in wanted):
            result += value
    return result


async def metrics(url: str) -> dict[str, float]:
    """Scrape /metrics uncompressed and return every sample (small expositions only)."""
    async with session() as s:
        result = await scrape(s, url)
    return samples(result.body.decode(), [""])


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """`with timer() as t: ...` then t["seconds"]."""
    box: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - started


# -- profiles --------------------------------------------------------------------------------


def py_spy() -> str | None:
    """py-spy beside this Python (pip install py-spy into the venv), else on PATH."""
    import shutil

    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile(pid: int, seconds: float, name: str, rate: int = 200) -> Path | None:
    """Sample `pid` with py-spy for `seconds`; the collapsed-stack file, or None without
    py-spy (or when it cannot attach)."""
    tool = py_spy()
    if tool is None:
        note("py-spy not found: `.venv/bin/pip install py-spy` to get a profile")
        return None
    OUTPUT.mkdir(parents=True, exist_ok=True)
    out = OUTPUT / f"{name}.raw.txt"
    proc = await asyncio.create_subprocess_exec(
        tool,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        note(f"py-spy failed ({proc.returncode}): {output.decode(errors='replace')[-500:]}")
        return None
    return out


def _function(frame: str) -> str:
    """'collect (exporter/metrics.py:231)' -> 'collect (exporter/metrics.py)'."""
    head, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/exporter/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/exporter/":
                path = "exporter/" + path
            break
    return f"{head} ({path})" if head else frame


#: Leaf frames that mean "waiting", not working: the event loop's epoll, idle pool threads.
IDLE_LEAVES = ("EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)")


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [_function(f) for f in stack.split(";") if f]
        if frames and count_text.isdigit():
            yield frames, int(count_text)


def profile_top(raw: Path, limit: int = 15) -> tuple[int, int, list[tuple[str, int, int]]]:
    """Samples in all, samples busy (not waiting in epoll or an idle pool thread), and the
    top busy functions as (function, own samples, inclusive samples), from collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    count_all = busy = 0
    for frames, count in _stacks(raw):
        count_all += count
        if frames[-1] in IDLE_LEAVES:
            continue
        busy += count
        own[frames[-1]] += count
        for function in set(frames):
            inclusive[function] += count
    top = [(f, n, inclusive[f]) for f, n in own.most_common(limit)]
    return count_all, busy, top


def profile_top_inclusive(raw: Path, limit: int = 15, prefix: str = "") -> list[tuple[str, int]]:
    """The functions with the most busy inclusive samples whose name contains `prefix`."""
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in _stacks(raw):
        if frames[-1] in IDLE_LEAVES:
            continue
        for function in set(frames):
            if prefix in function:
                inclusive[function] += count
    return inclusive.most_common(limit)


def print_profile(raw: Path, title: str, seconds: float, rate: int = 200) -> dict[str, Any]:
    """Print the top busy functions of a profile (percent of busy samples); a JSON summary."""
    count_all, busy, top = profile_top(raw)
    print_table(
        f"{title}: top functions by own samples, % of busy samples ({busy} busy of "
        f"{count_all} samples over {seconds:.0f} s at {rate}/s; file {raw.relative_to(ROOT)})",
        ["function", "own %", "incl %"],
        [(f, 100.0 * s / max(busy, 1), 100.0 * i / max(busy, 1)) for f, s, i in top],
    )
    ours = profile_top_inclusive(raw, prefix="exporter/")
    print_table(
        f"{title}: exporter functions by inclusive samples, % of busy samples",
        ["function", "incl %"],
        [(f, 100.0 * n / max(busy, 1)) for f, n in ours],
    )
    return {
        "profile": str(raw.relative_to(ROOT)),
        "busy_samples": busy,
        "top_self_pct": [[f, round(100.0 * s / max(busy, 1), 1)] for f, s, _ in top[:8]],
    }
