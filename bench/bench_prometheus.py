"""Prometheus' cost of `metrics.status_series`: series per upload, and a real Prometheus' memory.

For each mode (`all`, `active`) and size, an exporter tracking N uploads of bench/sim_server.py
(steady uploads, each polled once: 1-hour interval) is scraped by the Debian `prometheus`
binary (the one `make test` installs), on loopback, every --scrape-interval seconds, for
--scrapes scrapes. Read at the end from Prometheus' own /metrics and /proc: the samples of
the last scrape (`scrape_samples_scraped`), the series in its head block
(`prometheus_tsdb_head_series`), its Go heap in use, and its RSS and peak RSS (VmRSS, VmHWM).
Series per upload is (samples with N - samples with 0) / N; MiB per 1,000 series is the RSS
above the 0-upload run's divided by the head series above it.

    .venv/bin/python bench/bench_prometheus.py [--quick] [--sizes 10000,100000]

Prometheus keeps its TSDB in a temporary directory, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import common

MODES = ("all", "active")


async def polled(control: str, before: float, n: int, within: float) -> float:
    """Wait until the simulator has answered `n` polls more than `before`; how many it did."""
    deadline = time.monotonic() + within
    done = 0.0
    while n and time.monotonic() < deadline:
        done = (await common.get_json(f"{control}/stats"))["total"] - before
        if done >= n:
            break
        await asyncio.sleep(1.0)
    return done


async def measure(
    procs: common.Processes,
    mode: str,
    n: int,
    *,
    sim_port: int,
    control: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One exporter with `n` uploads in `mode`, scraped by a fresh Prometheus."""
    port = common.free_port()
    config = common.exporter_config(
        common.LOGS / f"prometheus-{mode}-{n}.yaml",
        base_url=f"http://{common.HOST}:{sim_port}",
        port=port,
        ingestion_ids=common.ids(n),
        max_rps=1000,
        concurrency=64,
        interval=3600,
        log_level=args.log_level,
        sections={"metrics": {"status_series": mode}},
    )
    before = (await common.get_json(f"{control}/stats"))["total"]
    exporter = procs.exporter(f"prometheus-{mode}-{n}-exporter", config, args.source)
    await common.wait_http(f"http://{common.HOST}:{port}/readyz", within=600, process=exporter)
    done = await polled(control, before, n, within=max(60.0, n / 200))
    storage = Path(tempfile.mkdtemp(prefix="bench-prometheus-"))
    prom_port = common.free_port()
    prom_config = storage / "prometheus.yml"
    interval = f"{args.scrape_interval:g}s"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": interval, "scrape_timeout": interval},
                "scrape_configs": [
                    {
                        "job_name": "catalog-upload-exporter",
                        "static_configs": [{"targets": [f"{common.HOST}:{port}"]}],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    prometheus = procs.start(
        f"prometheus-{mode}-{n}-server",
        [
            args.prometheus,
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={storage / 'data'}",
            f"--web.listen-address={common.HOST}:{prom_port}",
        ],
    )
    url = f"http://{common.HOST}:{prom_port}"
    try:
        await common.wait_http(f"{url}/-/ready", within=120, process=prometheus)
        await asyncio.sleep(args.scrape_interval * args.scrapes)
        own = await common.metrics(f"{url}/metrics")
        query = "scrape_samples_scraped"
        answer = await common.get_json(f"{url}/api/v1/query?query={query}")
        (sample,) = answer["data"]["result"]
        result = {
            "mode": mode,
            "uploads": n,
            "polled": done,
            "samples": float(sample["value"][1]),
            "head_series": common.total(own, "prometheus_tsdb_head_series"),
            "heap_inuse_mib": common.total(own, "go_memstats_heap_inuse_bytes") / 2**20,
            "rss_mib": common.rss_kib(prometheus.pid) / 1024,
            "peak_mib": common.hwm_kib(prometheus.pid) / 1024,
            "scrapes_done": common.total(own, "prometheus_target_interval_length_seconds_count"),
        }
    finally:
        prometheus.stop()
        exporter.stop()
        shutil.rmtree(storage, ignore_errors=True)
    common.note(f"{mode} {n}: {result}")
    return result


async def run(args: argparse.Namespace) -> None:
    """Every mode at 0 uploads (the baseline) and at every size."""
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or ([10_000] if args.quick else [10_000, 100_000])
    results: list[dict[str, Any]] = []
    with common.Processes() as procs:
        sim_port, control_port = common.free_port(), common.free_port()
        control = f"http://{common.HOST}:{control_port}"
        sim = procs.sim_server(
            "prometheus-simulator", port=sim_port, control_port=control_port, uploads=max(sizes)
        )
        await common.wait_http(f"{control}/stats", within=120, process=sim)
        for mode in MODES:
            for n in [0, *sizes]:
                results.append(
                    await measure(procs, mode, n, sim_port=sim_port, control=control, args=args)
                )
    baseline = {r["mode"]: r for r in results if r["uploads"] == 0}
    rows = []
    summary: dict[str, Any] = {
        "quick": args.quick,
        "scrape_interval_s": args.scrape_interval,
        "scrapes": args.scrapes,
    }
    for r in results:
        zero, n = baseline[r["mode"]], r["uploads"]
        per_upload = (r["samples"] - zero["samples"]) / n if n else None
        added_series = r["head_series"] - zero["head_series"]
        per_k_series = 1000 * (r["rss_mib"] - zero["rss_mib"]) / added_series if n else None
        rows.append(
            (
                r["mode"],
                n,
                r["samples"],
                per_upload,
                r["head_series"],
                r["heap_inuse_mib"],
                r["rss_mib"],
                r["peak_mib"],
                per_k_series,
            )
        )
        summary[f"{r['mode']}_{n}"] = {**r, "series_per_upload": per_upload}
    common.print_table(
        "Prometheus scraping the exporter, by metrics.status_series and uploads",
        [
            "mode",
            "uploads",
            "samples/scrape",
            "series/upload",
            "head series",
            "Go heap MiB",
            "RSS MiB",
            "peak RSS MiB",
            "RSS MiB/1k series",
        ],
        rows,
    )
    common.emit_summary("prometheus", common.rounded(summary, 2))


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="", help="comma-separated upload counts")
    p.add_argument("--scrape-interval", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--scrapes", type=int, default=12, help="scrapes before reading (default 12)")
    p.add_argument(
        "--prometheus",
        default=shutil.which("prometheus") or "/usr/bin/prometheus",
        help="the Prometheus binary (default: Debian's, on PATH)",
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
