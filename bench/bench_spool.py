"""Spool mode: how full the ingestions volume gets while an app registers uploads by file.

The exporter runs with `ingestions.directory_mode: spool` and the shipped sidecar's
`directory_poll_seconds` (2) and state settings, against bench/sim_server.py. For each rate in
`--rates` (files per second; 0: unpaced, as fast as one Python thread writes), the app's side
writes `--files` registration files (one small JSON document each, written to a dot-name and
renamed into place, as docs/registering.md asks) in batches of a tenth of a second, while a
sampler thread sums the directory's allocated bytes (st_blocks * 512, what counts against
an emptyDir's sizeLimit) every 10 ms. It reports the peak usage, against the sidecar's
16 MiB sizeLimit, and how long the last file took to be consumed.

    .venv/bin/python bench/bench_spool.py [--quick] [--files 20000] [--rates 500,1000,2000,0]
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import common

#: The sidecar component's emptyDir sizeLimit for the ingestions volume (16Mi).
SIZE_LIMIT = 16 * 1024 * 1024


def usage(directory: Path) -> tuple[int, int]:
    """Entries and allocated bytes in `directory` now."""
    files = allocated = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            files += 1
            allocated += status.st_blocks * 512
    return files, allocated


class Sampler(threading.Thread):
    """Samples the directory's usage every 10 ms until stopped; keeps the peaks."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.stop = threading.Event()
        self.peak_files = self.peak_bytes = 0

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stop.wait(0.01):
            files, allocated = usage(self.directory)
            self.peak_files = max(self.peak_files, files)
            self.peak_bytes = max(self.peak_bytes, allocated)


def write_files(directory: Path, prefix: str, count: int, rate: float) -> float:
    """Write `count` registration files at `rate` per second (0: unpaced); the seconds taken."""
    per_tick = count if rate <= 0 else max(1, round(rate / 10))
    started = time.monotonic()
    written = 0
    while written < count:
        for n in range(written, min(count, written + per_tick)):
            name = f"{prefix}-{n:07d}"
            document = {"ingestionId": f"amzn1.ingestion.{name}", "labels": {"team": "bench"}}
            temporary = directory / f".tmp-{name}"
            temporary.write_text(json.dumps(document))
            temporary.rename(directory / name)
        written = min(count, written + per_tick)
        if rate > 0:
            pause = started + written / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    return time.monotonic() - started


async def drained(directory: Path, within: float) -> float:
    """Wait until the directory is empty; the seconds waited."""
    started = time.monotonic()
    while usage(directory)[0] and time.monotonic() - started < within:  # noqa: ASYNC110 - a directory, no event to wait on
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def run(args: Any) -> None:
    """One exporter; each rate in turn against it."""
    files = 5_000 if args.quick else args.files
    rates = [float(r) for r in args.rates.split(",")]
    directory = common.LOGS / "spool-ingestions"
    state = common.LOGS / "spool-state" / "state.db"
    for path in (directory, state.parent):
        path.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.iterdir(), *state.parent.glob("state.db*")]:
        stale.unlink()
    rows: list[list[object]] = []
    summary: dict[str, Any] = {"files": files, "size_limit": SIZE_LIMIT, "runs": []}
    with common.Processes() as procs:
        base_url = await procs.running_sim_server("spool-simulator", uploads=10, within=60)
        port = common.free_port()
        config = common.exporter_config(
            common.LOGS / "spool.yaml",
            base_url=base_url,
            port=port,
            state_path=state,
            max_rps=5,
            concurrency=4,
            interval=60.0,
            log_level=args.log_level,
            sections={
                "ingestions": {
                    "directory": str(directory),
                    "directory_mode": "spool",
                    "directory_poll_seconds": 2,
                    "directory_size_limit_bytes": SIZE_LIMIT,
                    "labels": ["team"],
                    "max_tracked": 1_000_000,
                },
            },
        )
        exporter = procs.exporter("spool-exporter", config, args.source)
        await common.wait_http(f"http://{common.HOST}:{port}/healthz", within=60, process=exporter)
        for index, rate in enumerate(rates):
            sampler = Sampler(directory)
            sampler.start()
            seconds = await asyncio.to_thread(write_files, directory, f"r{index}", files, rate)
            waited = await drained(directory, within=600)
            sampler.stop.set()
            sampler.join()
            achieved = files / seconds
            run_summary = {
                "asked_rate": rate,
                "achieved_rate": achieved,
                "write_seconds": seconds,
                "drain_after_last_write_seconds": waited,
                "peak_files": sampler.peak_files,
                "peak_bytes": sampler.peak_bytes,
                "within_limit": sampler.peak_bytes <= SIZE_LIMIT,
            }
            summary["runs"].append(run_summary)
            rows.append(
                [
                    "unpaced" if rate <= 0 else f"{rate:g}",
                    round(achieved),
                    sampler.peak_files,
                    round(sampler.peak_bytes / 1024 / 1024, 2),
                    f"{100 * sampler.peak_bytes / SIZE_LIMIT:.0f}%",
                    round(waited, 2),
                    "yes" if run_summary["within_limit"] else "no",
                ]
            )
        found = await common.metrics(f"http://{common.HOST}:{port}/metrics")
        summary["tracked"] = common.total(found, "catalog_exporter_tracked_ingestions")
        exporter.stop(grace=60)
    common.print_table(
        f"Spool: {files} files per rate, directory_poll_seconds 2, sizeLimit 16 MiB",
        [
            "asked/s",
            "written/s",
            "peak files",
            "peak MiB",
            "of limit",
            "drained after (s)",
            "within",
        ],
        rows,
    )
    common.emit_summary("spool", summary)


def main() -> None:
    """Command line."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--rates", default="500,1000,2000,0", help="files per second; 0: unpaced")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
