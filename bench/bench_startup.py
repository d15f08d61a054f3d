"""Startup: from process start until /metrics answers with every id tracked.

The exporter is started (`python -m exporter --config ...`) with N ids from its config, from
the state database only (ids registered through the admin API in an earlier run), from both
(a restart), and from a JSON state file of release 1 (the first start after an upgrade, which
migrates it); against bench/sim_server.py, so polling starts for real. Measured from just
before the process is spawned: when /healthz first answers, and when a /metrics response
with `catalog_exporter_tracked_ingestions` = N has been read in full.

    .venv/bin/python bench/bench_startup.py [--quick] [--uploads 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import common
from exporter.state import UploadRecord, open_store

TRACKED = "catalog_exporter_tracked_ingestions"


def write_database(path: Path, ingestion_ids: list[str], source: str) -> Path:
    """A state database (exporter.state's schema), every upload INPROGRESS."""
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    now = time.time()
    store, result = open_store(path)
    assert store is not None, result.problem
    store.apply(
        [
            (
                ingestion_id,
                UploadRecord(
                    ingestion_id,
                    (source,),
                    {},
                    "INPROGRESS",
                    now - 600,
                    now - 300,
                    last_success=now - 30,
                    queue_observed=True,
                ),
            )
            for ingestion_id in ingestion_ids
        ]
    )
    store.close()
    return path


def write_state(path: Path, ingestion_ids: list[str], source: str) -> Path:
    """A JSON state file in release 1's format, every upload INPROGRESS."""
    now = time.time()
    document = {
        "version": 1,
        "written_at": now,
        "uploads": [
            {
                "ingestion_id": ingestion_id,
                "sources": [source],
                "labels": {},
                "status": "INPROGRESS",
                "first_seen": now - 600,
                "status_changed": now - 300,
                "last_success": now - 30,
                "terminal_at": None,
                "report_available": False,
                "queue_observed": True,
                "released": False,
            }
            for ingestion_id in ingestion_ids
        ],
        "retired": {},
    }
    path.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    return path


async def start_and_wait(
    procs: common.Processes,
    name: str,
    *,
    config: Path,
    port: int,
    n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Spawn the exporter and time its first answers."""
    spawned = time.monotonic()
    exporter = procs.exporter(name, config, args.source)
    url = f"http://{common.HOST}:{port}"
    healthy = await common.wait_http(f"{url}/healthz", within=600, process=exporter)
    tracked = -1.0
    attempts = 0
    first_scrape = None
    async with common.session() as s:
        while tracked != n and time.monotonic() - spawned < 600:
            attempts += 1
            result = await common.scrape(s, f"{url}/metrics")
            first_scrape = first_scrape or result.seconds
            found = common.samples(result.body.decode(), [TRACKED])
            tracked = found.get(TRACKED, -1.0)
            if tracked != n:
                await asyncio.sleep(0.05)
    answered = time.monotonic()
    rss = common.rss_kib(exporter.pid)
    code = exporter.stop(grace=60)
    return {
        "healthz_s": healthy - spawned,
        "metrics_all_tracked_s": answered - spawned,
        "first_scrape_s": first_scrape,
        "scrapes": attempts,
        "tracked": tracked,
        "rss_mib": rss / 1024,
        "exit": code,
    }


async def run(args: argparse.Namespace) -> None:
    """The three ways of starting, one after another against one simulator."""
    n = args.uploads or (10_000 if args.quick else 100_000)
    ingestion_ids = common.ids(n)
    results: dict[str, dict[str, Any]] = {}
    with common.Processes() as procs:
        base_url = await procs.running_sim_server("startup-simulator", uploads=n)
        state_dir = common.LOGS / "startup-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        scenarios: list[tuple[str, list[str], Path | None]] = [
            ("config", ingestion_ids, None),
            ("state db", [], write_database(state_dir / "api.db", ingestion_ids, "api")),
            (
                "config + state db",
                ingestion_ids,
                write_database(state_dir / "restart.db", ingestion_ids, "config"),
            ),
            (
                "JSON state file (migrated)",
                [],
                write_state(state_dir / "api.json", ingestion_ids, "api"),
            ),
        ]
        for label, config_ids, state in scenarios:
            port = common.free_port()
            config = common.exporter_config(
                common.LOGS / f"startup-{label.replace(' ', '').replace('+', '-')}.yaml",
                base_url=base_url,
                port=port,
                ingestion_ids=config_ids,
                max_rps=args.max_rps,
                concurrency=16,
                interval=60.0,
                log_level=args.log_level,
                state_path=state.resolve() if state else None,
            )
            state_mib = state.stat().st_size / 2**20 if state else 0.0
            common.note(f"starting from {label} with {n} ids")
            results[label] = await start_and_wait(
                procs,
                f"startup-{label.replace(' ', '')}",
                config=config,
                port=port,
                n=n,
                args=args,
            )
            results[label]["config_mib"] = config.stat().st_size / 2**20
            results[label]["state_mib"] = state_mib
    common.print_table(
        f"Startup with {n} ids (seconds from spawning the process; max_requests_per_second "
        f"{args.max_rps:g})",
        [
            "ids from",
            "config MiB",
            "state MiB",
            "/healthz",
            "/metrics, all tracked",
            "first scrape s",
            "scrapes",
            "RSS MiB",
        ],
        [
            (
                label,
                r["config_mib"],
                r["state_mib"],
                r["healthz_s"],
                r["metrics_all_tracked_s"],
                r["first_scrape_s"],
                r["scrapes"],
                r["rss_mib"],
            )
            for label, r in results.items()
        ],
    )
    common.emit_summary(
        "startup",
        common.rounded(
            {"quick": args.quick, "source": str(args.source), "uploads": n, **results}, 3
        ),
    )


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=0, help="default 100000 (quick 10000)")
    p.add_argument("--max-rps", type=float, default=100.0, help="polling during startup")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
