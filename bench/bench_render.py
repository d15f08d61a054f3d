"""Rendering the /metrics body in-process: `UploadExposition.chunks()`, joined, with N uploads.

No HTTP, no simulator, no polling task: an `UploadStore` with N uploads (each polled once,
INPROGRESS, full one-hot status series) and its `UploadExposition`, rendered once (cold),
then rendered again and again with simulated polls applied through the store between two
renders, as the poller would between two scrapes. Only the render is timed (`chunks()` joined;
`render()` in a source from before it was removed). Scenarios:

- idle: nothing changed since the last render;
- light: `--polls` last-success refreshes and `--changes` status changes (with a report
  link appearing) between renders;
- churn: light, plus `--churn` uploads removed and as many new ones added (and polled);
- all polled: every upload's last success refreshed between renders (the worst case for
  anything that caches by upload).

Plus gzip: the body compressed as aiohttp does it (`zlib`, default level, gzip wrapper);
and, where the exposition has them, `chunks()` (the body in pieces, unjoined, for a server
that streams them) and `gzip_chunks_off_loop()` (precompressed gzip in pieces, as the server
calls it; `gzip_chunks()` in older sources; checked to decompress to the body), each after a
light round of polls.
Memory: VmRSS of the process after building, after the first render (body dropped) and after
every render, VmHWM; then, in a fresh process with tracemalloc on, the bytes held by the
store and its rendered lines, what one render leaves behind (a cache), and the peak during
a render. Each size runs in a process of its own, so the sizes do not share an allocator.

    .venv/bin/python bench/bench_render.py [--quick] [--sizes 10000,100000] [--renders 30]
        [--source DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import common

SCENARIOS = ("idle", "light", "churn", "all polled")
START = 1_700_000_000.0


class Bench:
    """A store of `n` uploads and its exposition, from the exporter package on sys.path."""

    def __init__(self, n: int, args: argparse.Namespace) -> None:
        from prometheus_client import CollectorRegistry

        from exporter.exposition import UploadExposition
        from exporter.models import StatusReport
        from exporter.uploads import UploadStore

        self.report = StatusReport
        self.args = args
        self.rng = random.Random(n)
        self.now = START
        self.store = UploadStore(clock=lambda: self.now)
        self.exposition = UploadExposition(
            self.store, label_names=lambda: (), active_status_only=lambda: False
        )
        self.registry = CollectorRegistry()
        self.ids = common.ids(n)
        self.next_id = n + 1
        for ingestion_id in self.ids:
            self.store.add(ingestion_id, "config", {})
        self.now += 1
        for ingestion_id in self.ids:
            self.poll(ingestion_id, "INPROGRESS")

    def poll(self, ingestion_id: str, status: str, report: bool = False) -> None:
        self.store.record_report(ingestion_id, self.report(status, report, status))

    def render(self) -> bytes:
        """The whole body, as the server's pieces joined (older sources: their `render()`)."""
        if hasattr(self.exposition, "chunks"):
            return b"".join(self.exposition.chunks(self.registry, openmetrics=False))
        return self.exposition.render(self.registry, openmetrics=False)

    def gzip_chunks(self, loop: asyncio.AbstractEventLoop) -> list[bytes]:
        """The gzip pieces as the server gets them (older sources: the sync `gzip_chunks`)."""
        if hasattr(self.exposition, "gzip_chunks_off_loop"):
            job = self.exposition.gzip_chunks_off_loop(self.registry, openmetrics=False)
            return loop.run_until_complete(job)
        return self.exposition.gzip_chunks(self.registry, openmetrics=False)

    def between(self, scenario: str) -> None:
        """What the poller does between two scrapes in `scenario`."""
        self.now += 1.0
        rng, store = self.rng, self.store
        if scenario == "idle":
            return
        if scenario == "all polled":
            for upload in list(store):
                self.poll(upload.ingestion_id, upload.status, upload.report_available)
            return
        uploads = list(store)
        for upload in rng.sample(uploads, min(self.args.polls, len(uploads))):
            self.poll(upload.ingestion_id, upload.status, upload.report_available)
        for upload in rng.sample(uploads, min(self.args.changes, len(uploads))):
            new = "DONE" if upload.status == "INPROGRESS" else "INPROGRESS"
            self.poll(upload.ingestion_id, new, new == "DONE")
        if scenario == "churn":
            for upload in rng.sample(uploads, min(self.args.churn, len(uploads))):
                store.remove(upload.ingestion_id)
            for _ in range(self.args.churn):
                ingestion_id = f"new-{self.next_id:07d}"
                self.next_id += 1
                store.add(ingestion_id, "api", {})
                self.poll(ingestion_id, "INQUEUE")


def rss_mib() -> float:
    return common.rss_kib(os.getpid()) / 1024


def timed(fn: Callable[[], bytes]) -> tuple[float, bytes]:
    start = time.perf_counter()
    body = fn()
    return time.perf_counter() - start, body


def child_timing(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build, render cold, then every scenario `--renders` times (all polled: a third)."""
    out: dict[str, Any] = {"uploads": n, "rss_start_mib": rss_mib()}
    started = time.perf_counter()
    bench = Bench(n, args)
    out["build_s"] = time.perf_counter() - started
    out["rss_built_mib"] = rss_mib()
    seconds, body = timed(bench.render)
    out["cold_ms"] = seconds * 1000
    out["body_bytes"] = len(body)
    del body
    out["rss_after_first_mib"] = rss_mib()
    for scenario in SCENARIOS:
        renders = max(3, args.renders // 3) if scenario == "all polled" else args.renders
        times = []
        for _ in range(renders):
            bench.between(scenario)
            seconds, body = timed(bench.render)
            times.append(seconds * 1000)
            del body
        out[scenario] = common.stats(times)
    body = bench.render()
    out["body_bytes_end"] = len(body)
    times = []
    for _ in range(max(3, args.renders // 3)):
        start = time.perf_counter()
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        gz = compressor.compress(body) + compressor.flush()
        times.append((time.perf_counter() - start) * 1000)
    out["gzip_ms"] = common.stats(times)
    out["gzip_bytes"] = len(gz)
    del gz, body
    # Measured here, before the extra phases below (which hold several bodies at once).
    out["rss_end_mib"] = rss_mib()
    out["hwm_mib"] = common.hwm_kib(os.getpid()) / 1024
    exposition = bench.exposition
    if hasattr(exposition, "chunks"):  # the body in pieces, for a server that streams them
        times = []
        for _ in range(args.renders):
            bench.between("light")
            start = time.perf_counter()
            exposition.chunks(bench.registry, openmetrics=False)
            times.append((time.perf_counter() - start) * 1000)
        out["chunks_ms"] = common.stats(times)
    if hasattr(exposition, "gzip_chunks_off_loop") or hasattr(exposition, "gzip_chunks"):
        loop = asyncio.new_event_loop()  # precompressed gzip, in pieces
        seconds, _ = timed(lambda: b"".join(bench.gzip_chunks(loop)))
        out["gzip_chunks_cold_ms"] = seconds * 1000  # every block compressed
        times = []
        for _ in range(args.renders):
            bench.between("light")
            start = time.perf_counter()
            pieces = bench.gzip_chunks(loop)
            times.append((time.perf_counter() - start) * 1000)
        loop.close()
        out["gzip_chunks_ms"] = common.stats(times)
        out["gzip_chunks_bytes"] = sum(map(len, pieces))
        if gzip.decompress(b"".join(pieces)) != bench.render():
            msg = "the gzip pieces do not decompress to the body"
            raise AssertionError(msg)
        del pieces
    return out


def child_memory(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """tracemalloc: held after building, left behind by a render, peak during one."""
    tracemalloc.start()
    bench = Bench(n, args)
    built, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    body = bench.render()
    _, peak_first = tracemalloc.get_traced_memory()
    del body
    after_first, _ = tracemalloc.get_traced_memory()
    bench.between("light")
    tracemalloc.reset_peak()
    body = bench.render()
    _, peak_light = tracemalloc.get_traced_memory()
    size = len(body)
    del body
    after_light, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib = 1024 * 1024
    return {
        "store_mib": built / mib,
        "retained_by_render_mib": (after_first - built) / mib,
        "peak_first_render_mib": peak_first / mib,
        "retained_after_light_mib": (after_light - built) / mib,
        "peak_light_render_mib": peak_light / mib,
        "body_mib": size / mib,
    }


def run_child(n: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        common.PYTHON,
        __file__,
        "--child",
        f"{mode}:{n}",
        "--source",
        str(args.source),
        "--renders",
        str(args.renders),
        "--polls",
        str(args.polls),
        "--changes",
        str(args.changes),
        "--churn",
        str(args.churn),
    ]
    common.note(f"{n} uploads: {mode}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"{mode}:{n} failed:\n{done.stderr}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Parse the arguments; run each size in a child process and print the tables."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="", help="comma-separated upload counts")
    p.add_argument("--renders", type=int, default=30, help="renders timed per scenario")
    p.add_argument("--polls", type=int, default=150, help="last-success refreshes per render")
    p.add_argument("--changes", type=int, default=5, help="status changes per render")
    p.add_argument("--churn", type=int, default=50, help="removed + added per render (churn)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, str(args.source))
        mode, n = args.child.split(":")
        result = (child_timing if mode == "timing" else child_memory)(int(n), args)
        print(json.dumps(result))
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or ([10_000] if args.quick else [10_000, 100_000])
    results = [(run_child(n, "timing", args), run_child(n, "memory", args)) for n in sizes]
    rows = []
    for timing, _ in results:
        rows.append((timing["uploads"], "cold (first)", 1, timing["cold_ms"], None, None, None))
        for scenario in SCENARIOS:
            s = timing[scenario]
            rows.append(
                (timing["uploads"], scenario, s["n"], s["median"], s["p90"], s["p99"], s["max"])
            )
        for key, label in (
            ("gzip_ms", "+ gzip (zlib, as aiohttp)"),
            ("chunks_ms", "light, chunks() (no join)"),
            ("gzip_chunks_cold_ms", "gzip pieces, first"),
            ("gzip_chunks_ms", "light, gzip pieces"),
        ):
            if isinstance(timing.get(key), float):
                rows.append((timing["uploads"], label, 1, timing[key], None, None, None))
            elif key in timing:
                g = timing[key]
                row = (g["n"], g["median"], g["p90"], g["p99"], g["max"])
                rows.append((timing["uploads"], label, *row))
    common.print_table(
        f"render ms, source {args.source}",
        ["uploads", "scenario", "renders", "median", "p90", "p99", "max"],
        rows,
    )
    common.print_table(
        "Memory (MiB): process RSS, and tracemalloc in a fresh process",
        [
            "uploads",
            "body",
            "gzip body",
            "RSS built",
            "after 1st render",
            "after all",
            "HWM",
            "traced store",
            "kept by render",
            "peak in render",
        ],
        [
            (
                t["uploads"],
                t["body_bytes"] / 2**20,
                t["gzip_bytes"] / 2**20,
                t["rss_built_mib"],
                t["rss_after_first_mib"],
                t["rss_end_mib"],
                t["hwm_mib"],
                m["store_mib"],
                m["retained_by_render_mib"],
                m["peak_first_render_mib"],
            )
            for t, m in results
        ],
    )
    summary: dict[str, Any] = {"quick": args.quick, "source": str(args.source)}
    for timing, memory in results:
        summary[str(timing["uploads"])] = {**timing, "memory": memory}
    common.emit_summary("render", common.rounded(summary, 2))


if __name__ == "__main__":
    main()
