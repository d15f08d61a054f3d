"""Freshness and fairness: how regularly each upload is polled, with and without enough budget.

The simulator runs in this process (its request log gives the time of every poll of every
upload; no rate limit of its own), the exporter in a subprocess with `max_requests_per_second`
= R, `interval_seconds` = T and the default jitter (10%; `--jitter` sets another).

(a) N/T < R (e.g. N=500, T=10 s, R=100): the gap between consecutive polls of an upload
    should be T give or take the jitter: p99 <= 1.1 T?
(b) N/T > R: every upload still gets its turn: the oldest poll age (the longest gap, and the
    age at the end) should stay under 1.2 N/R. `catalog_exporter_poll_lag_seconds` is read
    from /metrics every 5 s when the exporter has it.

    .venv/bin/python bench/bench_fairness.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import common
from exporter.simulator import SimulatedUpload, Simulator, create_app

LAG_METRIC = "catalog_exporter_poll_lag_seconds"


@dataclass(frozen=True)
class Case:
    """One fairness condition."""

    name: str
    uploads: int
    interval: float
    budget: float
    duration: float


def cases(quick: bool) -> list[Case]:
    """(a) with spare budget, (b) short of budget."""
    if quick:
        return [Case("a", 100, 2.0, 100.0, 20.0), Case("b", 200, 1.0, 40.0, 25.0)]
    return [Case("a", 500, 10.0, 100.0, 120.0), Case("b", 2000, 10.0, 100.0, 120.0)]


async def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Serve an in-process simulator, run an exporter against it, read the request log."""
    sim = Simulator(rate_limit=None, max_records=None)
    sim.add_uploads(
        SimulatedUpload(ingestion_id, [("INPROGRESS", 0.0)])
        for ingestion_id in common.ids(case.uploads)
    )
    runner = web.AppRunner(create_app(sim), access_log=None)
    await runner.setup()
    sim_port, port = common.free_port(), common.free_port()
    await web.TCPSite(runner, common.HOST, sim_port).start()
    lag_samples: list[tuple[float, dict[str, float]]] = []
    try:
        with common.Processes() as procs:
            config = common.exporter_config(
                common.LOGS / f"fairness-{case.name}.yaml",
                base_url=f"http://{common.HOST}:{sim_port}",
                port=port,
                ingestion_ids=common.ids(case.uploads),
                max_rps=case.budget,
                concurrency=16,
                interval=case.interval,
                timeout=5.0,
                log_level=args.log_level,
                polling=None if args.jitter is None else {"jitter_ratio": args.jitter},
            )
            exporter = procs.exporter(f"fairness-{case.name}-exporter", config, args.source)
            url = f"http://{common.HOST}:{port}"
            await common.wait_http(f"{url}/readyz", within=120, process=exporter)
            started = time.monotonic()
            common.note(
                f"({case.name}) N={case.uploads}, T={case.interval:g} s, R={case.budget:g}/s: "
                f"running {case.duration:.0f} s"
            )
            while time.monotonic() - started < case.duration:
                await asyncio.sleep(min(5.0, case.duration - (time.monotonic() - started)))
                found = await common.metrics(f"{url}/metrics")
                lag = {k: v for k, v in found.items() if k.startswith(LAG_METRIC)}
                lag_samples.append((time.monotonic() - started, lag))
            end = time.monotonic()
            exporter.stop()
    finally:
        await runner.cleanup()
    return analyse(case, sim, started, end, lag_samples)


def analyse(
    case: Case,
    sim: Simulator,
    started: float,
    end: float,
    lag_samples: list[tuple[float, dict[str, float]]],
) -> dict[str, Any]:
    """Gaps between consecutive polls of each upload, the oldest age, the lag metric."""
    polls: dict[str, list[float]] = collections.defaultdict(list)
    codes: collections.Counter[str] = collections.Counter()
    for record in sim.requests:
        codes[str(record.status)] += 1
        if record.ingestion_id is not None and record.status == 200:
            polls[record.ingestion_id].append(record.time)
    gaps = [b - a for times in polls.values() for a, b in itertools.pairwise(times)]
    # The age an upload has when the run ends counts too: one never polled again is stale.
    open_ages = [end - times[-1] for times in polls.values() if times]
    never = case.uploads - len(polls)
    oldest = max([*gaps, *open_ages], default=float("nan"))
    total = sum(len(t) for t in polls.values())
    lag_values = [max(v.values()) for _, v in lag_samples if v]
    # After the first round (every upload polled once) the start-up burst is over.
    first_round = max(case.interval, case.uploads / case.budget)
    lag_steady = [max(v.values()) for at, v in lag_samples if v and at > first_round + 1.0]
    result: dict[str, Any] = {
        "uploads": case.uploads,
        "interval_s": case.interval,
        "budget_rps": case.budget,
        "demand_rps": case.uploads / case.interval,
        "duration_s": end - started,
        "polls": total,
        "polls_per_s": total / (end - started) if end > started else float("nan"),
        "never_polled": never,
        "codes": dict(codes),
        "gap": common.stats(gaps),
        "oldest_age_s": oldest,
        "lag_metric_present": bool(lag_values),
        "lag_metric_max": max(lag_values) if lag_values else None,
        "lag_metric_max_after_first_round": max(lag_steady) if lag_steady else None,
        "lag_metric_samples": [
            [round(t, 1), {k: round(v, 3) for k, v in s.items()}] for t, s in lag_samples if s
        ][:3],
    }
    if case.uploads / case.interval < case.budget:
        bound = 1.1 * case.interval
        result["bound_s"] = bound
        result["within_share"] = sum(1 for g in gaps if g <= bound) / len(gaps) if gaps else 0
        result["target_met"] = result["gap"]["p99"] <= bound and never == 0
    else:
        bound = 1.2 * case.uploads / case.budget
        result["bound_s"] = bound
        result["target_met"] = oldest <= bound and never == 0
    return result


async def run(args: argparse.Namespace) -> None:
    """Both cases, the table, the summary."""
    results = [(case, await run_case(case, args)) for case in cases(args.quick)]
    rows = []
    for case, r in results:
        gap = r["gap"]
        rows.append(
            (
                case.name,
                case.uploads,
                case.interval,
                case.budget,
                r["demand_rps"],
                r["polls_per_s"],
                gap["median"],
                gap["p99"],
                gap["max"],
                r["oldest_age_s"],
                ("p99 <= " if case.name == "a" else "oldest <= ") + f"{r['bound_s']:.1f}",
                "yes" if r["target_met"] else "NO",
                r["never_polled"],
                r["lag_metric_max"] if r["lag_metric_present"] else "absent",
                r["lag_metric_max_after_first_round"] if r["lag_metric_present"] else "-",
            )
        )
    common.print_table(
        "Time between consecutive polls of each upload (seconds, from the simulator's log)",
        [
            "case",
            "N",
            "T s",
            "R/s",
            "N/T",
            "polls/s",
            "gap median",
            "gap p99",
            "gap max",
            "oldest age",
            "target",
            "met",
            "never polled",
            "lag metric max",
            "lag max after 1st round",
        ],
        rows,
    )
    for case, r in results:
        if r["lag_metric_present"]:
            print(f"({case.name}) {LAG_METRIC} samples: {r['lag_metric_samples']}")
        else:
            print(f"({case.name}) {LAG_METRIC}: not exposed by this exporter build")
    common.emit_summary(
        "fairness",
        common.rounded(
            {
                "quick": args.quick,
                "source": str(args.source),
                "jitter_ratio": "default" if args.jitter is None else args.jitter,
                **{
                    case.name: {k: v for k, v in r.items() if k != "lag_metric_samples"}
                    for case, r in results
                },
            },
            3,
        ),
    )


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--jitter",
        type=float,
        default=None,
        help="polling.jitter_ratio (default: the exporter's, 0.1); 0 shows the bare overhead",
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
