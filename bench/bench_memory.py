"""Memory: resident set size of the exporter process by number of tracked uploads.

For each size (and for 0 uploads, the baseline) an exporter is started with that many ids
in its config, against bench/sim_server.py (steady uploads, no rate limit), with a long
interval so that every upload is polled once and then left alone. VmRSS is read from
/proc/<pid>/status when it is ready (ids tracked, not yet polled), once every upload has
been polled, and after a /metrics scrape (with VmHWM, the peak). Bytes per upload is
(RSS with N - RSS with 0) / N.

    .venv/bin/python bench/bench_memory.py [--quick] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import common


async def measure(
    procs: common.Processes,
    n: int,
    *,
    sim_port: int,
    control: str,
    args: argparse.Namespace,
    poll_within: float,
) -> dict[str, Any]:
    """Start an exporter tracking `n` uploads; its RSS at each stage, KiB."""
    port = common.free_port()
    config = common.exporter_config(
        common.LOGS / f"memory-{n}.yaml",
        base_url=f"http://{common.HOST}:{sim_port}",
        port=port,
        ingestion_ids=common.ids(n),
        max_rps=1000,
        concurrency=64,
        interval=3600,
        log_level=args.log_level,
    )
    # Counted from before the start: with a 1-hour interval each upload is polled once.
    before = (await common.get_json(f"{control}/stats"))["total"]
    exporter = procs.exporter(f"memory-{n}-exporter", config, args.source)
    url = f"http://{common.HOST}:{port}"
    await common.wait_http(f"{url}/readyz", within=600, process=exporter)
    await asyncio.sleep(1.0)
    result: dict[str, Any] = {"uploads": n, "ready_kib": common.rss_kib(exporter.pid)}
    deadline = time.monotonic() + poll_within
    polled = 0
    while n and time.monotonic() < deadline:
        polled = (await common.get_json(f"{control}/stats"))["total"] - before
        if polled >= n:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(1.0)
    result["polled"] = polled
    result["polled_kib"] = common.rss_kib(exporter.pid)
    async with common.session() as s:
        first = await common.scrape(s, f"{url}/metrics")
        result["scrape_s"] = first.seconds
        result["scrape_bytes"] = first.size
        result["after_scrape_kib"] = common.rss_kib(exporter.pid)
        await asyncio.sleep(1.0)
        await common.scrape(s, f"{url}/metrics")
        result["after_2_scrapes_kib"] = common.rss_kib(exporter.pid)
    result["peak_kib"] = common.hwm_kib(exporter.pid)
    exporter.stop()
    common.note(f"{n}: {result}")
    return result


async def run(args: argparse.Namespace) -> None:
    """Baseline, then every size."""
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or ([10_000] if args.quick else [10_000, 100_000])
    results = []
    with common.Processes() as procs:
        sim_port, control_port = common.free_port(), common.free_port()
        control = f"http://{common.HOST}:{control_port}"
        sim = procs.sim_server(
            "memory-simulator", port=sim_port, control_port=control_port, uploads=max(sizes)
        )
        await common.wait_http(f"{control}/stats", within=120, process=sim)
        for n in [0, *sizes]:
            poll_within = 40.0 if args.quick else max(60.0, n / 300)
            results.append(
                await measure(
                    procs, n, sim_port=sim_port, control=control, args=args, poll_within=poll_within
                )
            )
    zero = results[0]
    rows = []
    summary: dict[str, Any] = {"quick": args.quick, "source": str(args.source)}
    for r in results:
        n = r["uploads"]
        per_ready = 1024 * (r["ready_kib"] - zero["ready_kib"]) / n if n else None
        per_polled = 1024 * (r["polled_kib"] - zero["polled_kib"]) / n if n else None
        per_scraped = (
            1024 * (r["after_2_scrapes_kib"] - zero["after_2_scrapes_kib"]) / n if n else None
        )
        rows.append(
            (
                n,
                r["ready_kib"] / 1024,
                f"{r['polled']}",
                r["polled_kib"] / 1024,
                r["after_scrape_kib"] / 1024,
                r["after_2_scrapes_kib"] / 1024,
                r["peak_kib"] / 1024,
                per_ready,
                per_polled,
                per_scraped,
                r["scrape_s"],
            )
        )
        summary[str(n)] = {
            "rss_ready_mib": r["ready_kib"] / 1024,
            "rss_polled_mib": r["polled_kib"] / 1024,
            "rss_after_scrape_mib": r["after_scrape_kib"] / 1024,
            "peak_mib": r["peak_kib"] / 1024,
            "bytes_per_upload_polled": per_polled,
            "bytes_per_upload_ready": per_ready,
            "bytes_per_upload_after_scrapes": per_scraped,
            "polled": r["polled"],
        }
    common.print_table(
        "Exporter RSS (MiB) by tracked uploads",
        [
            "uploads",
            "ready",
            "polls done",
            "all polled",
            "after scrape",
            "after 2nd scrape",
            "peak (HWM)",
            "B/upload ready",
            "B/upload polled",
            "B/upload scraped",
            "scrape s",
        ],
        rows,
    )
    common.emit_summary("memory", common.rounded(summary, 1))


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="", help="comma-separated upload counts")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
