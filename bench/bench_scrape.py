"""Scrape latency: GET /metrics with N tracked uploads while polling runs at full speed.

Three processes on loopback: bench/sim_server.py (the simulator with N steady uploads, no
rate limit, and a control listener for faults), the exporter (`python -m exporter`, limit
1000 requests/s, 64 in flight, interval 1 s: more demand than it can serve, so it polls as
fast as it can), and bench/naive_server.py (the same per-upload families as labelled
prometheus_client Gauges + generate_latest, the obvious way). This process scrapes.

Scenarios, in this order: calm (the exporter alone: the reference for the faults), vs naive
(exporter and naive baseline scraped alternately), gzip (`Accept-Encoding: gzip`, both
alternately), then the upstream answering only 500s, hanging, and only 429s (the
simulator's `inject(Fault(...))`; the throttle runs last because the exporter's rate then
takes 30 s to recover). Measuring starts once every upload has been polled (or after a
cap). Latency is send to last byte, body not decompressed.

    .venv/bin/python bench/bench_scrape.py [--quick] [--sizes 10000,100000] [--scrapes K]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import common


@dataclass(frozen=True)
class Scenario:
    """One measured condition."""

    name: str
    headers: dict[str, str]
    fault: dict[str, Any] | None = None
    baseline: bool = False


SCENARIOS = (
    Scenario("calm", common.IDENTITY),
    Scenario("vs naive", common.IDENTITY, baseline=True),
    Scenario("gzip", common.GZIP, baseline=True),
    Scenario("500s", common.IDENTITY, {"kind": "server_error_json"}),
    Scenario("hang", common.IDENTITY, {"kind": "hang"}),
    Scenario("429s", common.IDENTITY, {"kind": "throttle"}),
)

#: api.timeout_seconds of the exporter: a hanging upstream holds each request this long.
TIMEOUT_SECONDS = 2.0


#: Fewest scrapes per scenario and target, whatever the time budget says.
MIN_SCRAPES = 5
#: In one round a fast target is scraped up to this many times per scrape of a slow one.
MAX_REPEAT = 20


async def scrape_series(
    targets: dict[str, str], headers: dict[str, str], count: int, budget: float, pause: float
) -> dict[str, list[common.Scrape]]:
    """Rounds of scrapes of every target, `pause` s apart, until `budget` seconds have passed
    and every target has MIN_SCRAPES, or every target has `count`. Within a round a faster
    target is scraped as many times as fit in the slowest one's last scrape, so that both
    are sampled over the same stretch of time and conditions."""
    results: dict[str, list[common.Scrape]] = {name: [] for name in targets}
    deadline = time.monotonic() + budget
    async with common.session() as s:
        while any(len(r) < count for r in results.values()):
            fewest = min(len(r) for r in results.values())
            if fewest >= MIN_SCRAPES and time.monotonic() > deadline:
                break
            slowest = max((r[-1].seconds for r in results.values() if r), default=0.0)
            for name, url in targets.items():
                last = results[name][-1].seconds if results[name] else slowest
                repeat = min(MAX_REPEAT, max(1, round(slowest / max(last, 1e-6))))
                repeat = min(repeat, count - len(results[name]))
                for _ in range(repeat):
                    result = await common.scrape(s, url, headers)
                    if result.status != 200:
                        msg = f"{name} answered {result.status}"
                        raise RuntimeError(msg)
                    # Keep the first body (to count series); drop the others.
                    if results[name]:
                        result = common.Scrape(
                            result.seconds, result.size, result.status, b"", result.encoding
                        )
                    results[name].append(result)
                    await asyncio.sleep(pause)
    return results


async def run_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every scenario with `n` tracked uploads; one result dict per (scenario, target)."""
    scrapes = args.scrapes or (40 if args.quick else 400)
    budget = args.budget or (6.0 if args.quick else 45.0)
    warmup = 10.0 if args.quick else max(60.0, n / 300)
    rows: list[dict[str, Any]] = []
    with common.Processes() as procs:
        sim_port, control_port = common.free_port(), common.free_port()
        port, naive_port = common.free_port(), common.free_port()
        control = f"http://{common.HOST}:{control_port}"
        sim = procs.sim_server(
            f"scrape-{n}-simulator", port=sim_port, control_port=control_port, uploads=n
        )
        naive = procs.start(
            f"scrape-{n}-naive",
            [
                common.PYTHON,
                str(common.BENCH / "naive_server.py"),
                "--port",
                str(naive_port),
                "--uploads",
                str(n),
                "--updates-per-second",
                str(args.naive_updates),
            ],
            cwd=common.ROOT,
        )
        await common.wait_http(f"{control}/stats", within=120, process=sim)
        config = common.exporter_config(
            common.LOGS / f"scrape-{n}.yaml",
            base_url=f"http://{common.HOST}:{sim_port}",
            port=port,
            ingestion_ids=common.ids(n),
            max_rps=1000,
            concurrency=64,
            interval=1.0,
            timeout=TIMEOUT_SECONDS,
            log_level=args.log_level,
            sections={"metrics": {"status_series": args.status_series}}
            if args.status_series
            else None,
        )
        exporter = procs.exporter(f"scrape-{n}-exporter", config, args.source)
        url = f"http://{common.HOST}:{port}"
        await common.wait_http(f"{url}/readyz", within=600, process=exporter)
        await common.wait_http(
            f"http://{common.HOST}:{naive_port}/healthz", within=600, process=naive
        )
        common.note(f"{n} uploads: exporter and baseline up; warming up (<= {warmup:.0f} s)")
        deadline = time.monotonic() + warmup
        polled = 0
        while time.monotonic() < deadline:
            polled = (await common.get_json(f"{control}/stats"))["distinct_ids"]
            if polled >= n:
                break
            await asyncio.sleep(1.0)
        common.note(f"{polled} of {n} uploads polled at least once; measuring")
        targets_all = {
            "exporter": f"{url}/metrics",
            "naive": f"http://{common.HOST}:{naive_port}/metrics",
        }
        # The first scrape of a process builds what later ones reuse: timed on its own row,
        # kept out of the scenarios (Prometheus scrapes for as long as the exporter runs).
        async with common.session() as s:
            first_scrape = await common.scrape(s, targets_all["exporter"])
        rows.append(
            {
                "uploads": n,
                "scenario": "first scrape",
                "target": "exporter",
                **common.stats([first_scrape.seconds]),
                "bytes": first_scrape.size,
                "encoding": first_scrape.encoding or "identity",
                "status_series": first_scrape.body.count(b"\ncatalog_upload_status{"),
                "upstream_per_s": 0.0,
                "upstream_codes": {},
                "exporter_cpu_share": 0.0,
            }
        )
        for scenario in SCENARIOS:
            if scenario.fault is not None:
                await common.get_json(f"{control}/faults", "POST", scenario.fault)
                await asyncio.sleep(TIMEOUT_SECONDS + 1.0)
            targets = targets_all if scenario.baseline else {"exporter": targets_all["exporter"]}
            before = await common.get_json(f"{control}/stats")
            cpu_before, t_before = common.cpu_seconds(exporter.pid), time.monotonic()
            results = await scrape_series(targets, scenario.headers, scrapes, budget, args.pause)
            after = await common.get_json(f"{control}/stats")
            wall = time.monotonic() - t_before
            cpu_share = (common.cpu_seconds(exporter.pid) - cpu_before) / wall
            answered = {
                code: after["by_status"].get(code, 0) - before["by_status"].get(code, 0)
                for code in after["by_status"]
            }
            if scenario.fault is not None:
                await common.get_json(f"{control}/faults", "DELETE")
            for target, series in results.items():
                latencies = [r.seconds for r in series]
                first = series[0]
                rows.append(
                    {
                        "uploads": n,
                        "scenario": scenario.name,
                        "target": target,
                        **common.stats(latencies),
                        "bytes": first.size,
                        "encoding": first.encoding or "identity",
                        "status_series": first.body.count(b"\ncatalog_upload_status{"),
                        "upstream_per_s": sum(answered.values()) / wall,
                        "upstream_codes": answered,
                        "exporter_cpu_share": cpu_share,
                    }
                )
            common.note(f"{n}: {scenario.name} done")
        code = exporter.stop()
        if code != 0:
            print(f"note: exporter ({n}) exited {code}")
    return rows


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    return a["median"] / b["median"], a["p99"] / b["p99"]


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; the summary for the JSON line."""
    common.print_table(
        "GET /metrics latency (seconds, send to last byte; p99 of few scrapes ~ max)",
        [
            "uploads",
            "scenario",
            "target",
            "n",
            "median",
            "p90",
            "p99",
            "max",
            "MB",
            "status series",
            "upstream req/s",
            "exporter CPU %",
        ],
        [
            (
                r["uploads"],
                r["scenario"],
                r["target"],
                r["n"],
                r["median"],
                r["p90"],
                r["p99"],
                r["max"],
                r["bytes"] / 1e6,
                r["status_series"] or "-",
                r["upstream_per_s"] if r["target"] == "exporter" else "-",
                100.0 * r["exporter_cpu_share"] if r["target"] == "exporter" else "-",
            )
            for r in rows
        ],
    )
    by_key = {(r["uploads"], r["scenario"], r["target"]): r for r in rows}
    summary: dict[str, Any] = {}
    comparisons = []
    for n in sorted({r["uploads"] for r in rows}):
        calm = by_key[(n, "calm", "exporter")]
        side = by_key[(n, "vs naive", "exporter")]
        naive = by_key[(n, "vs naive", "naive")]
        gzip = by_key[(n, "gzip", "exporter")]
        naive_gzip = by_key[(n, "gzip", "naive")]
        entry: dict[str, Any] = {
            "median_s": calm["median"],
            "p99_s": calm["p99"],
            "bytes": calm["bytes"],
            "calm_upstream_per_s": calm["upstream_per_s"],
            "side_by_side_median_s": side["median"],
            "side_by_side_p99_s": side["p99"],
            "naive_median_s": naive["median"],
            "naive_p99_s": naive["p99"],
            "naive_over_exporter_median": naive["median"] / side["median"],
            "naive_over_exporter_p99": naive["p99"] / side["p99"],
            "naive_bytes": naive["bytes"],
            "gzip_median_s": gzip["median"],
            "gzip_p99_s": gzip["p99"],
            "gzip_extra_median_s": gzip["median"] - side["median"],
            "gzip_bytes": gzip["bytes"],
            "naive_gzip_median_s": naive_gzip["median"],
        }
        first = by_key.get((n, "first scrape", "exporter"))
        if first is not None:
            entry["first_scrape_s"] = first["median"]
        comparisons.append((n, "vs naive", "naive / exporter", *_ratios(naive, side)))
        comparisons.append((n, "gzip", "gzip / identity", *_ratios(gzip, side)))
        comparisons.append((n, "gzip", "naive gzip / exporter gzip", *_ratios(naive_gzip, gzip)))
        for fault in ("500s", "hang", "429s"):
            row = by_key[(n, fault, "exporter")]
            entry[f"{fault}_p99_s"] = row["p99"]
            entry[f"{fault}_p99_over_calm"] = row["p99"] / calm["p99"]
            entry[f"{fault}_upstream_per_s"] = row["upstream_per_s"]
            comparisons.append((n, fault, f"{fault} / calm", *_ratios(row, calm)))
        summary[str(n)] = entry
    common.print_table(
        "Ratios (> 1: the first is slower)",
        ["uploads", "scenario", "ratio", "median ratio", "p99 ratio"],
        comparisons,
    )
    return summary


async def run(args: argparse.Namespace) -> None:
    """Every size, then the report."""
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or ([10_000] if args.quick else [10_000, 100_000])
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows += await run_size(n, args)
    summary = report(rows)
    common.emit_summary(
        "scrape",
        common.rounded({"quick": args.quick, "source": str(args.source), "sizes": summary}, 4),
    )


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="", help="comma-separated upload counts")
    p.add_argument(
        "--scrapes", type=int, default=0, help="most scrapes per scenario and target (40/400)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        help=f"seconds per scenario (6; full 45), at least {MIN_SCRAPES} scrapes each",
    )
    p.add_argument("--pause", type=float, default=0.25, help="seconds between scrapes")
    p.add_argument(
        "--status-series",
        choices=["all", "active"],
        default="",
        help="the exporter's metrics.status_series (default: not set, the exporter's default)",
    )
    p.add_argument(
        "--naive-updates", type=float, default=500.0, help="baseline gauge updates per second"
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
