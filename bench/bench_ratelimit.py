"""Rate-limit efficiency: how close to an upstream limit it is not told of the exporter gets.

bench/sim_server.py answers 429 beyond R requests/s (a token bucket of R tokens); the
exporter's own limit is 3R (it must discover R through 429s and its AIMD limiter), then 0.8R
(it should never be throttled). /metrics is sampled every 5 s:
`catalog_api_requests_total{code}` gives successful requests/s and the share of 429s per
window. Target: >= 90% of R with < 2% 429s (3R, after the first window); zero 429s (0.8R).
An ASCII plot goes to bench/output/ratelimit.txt.

    .venv/bin/python bench/bench_ratelimit.py [--quick] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from typing import Any

import common

WINDOW = 5.0


async def scenario(
    name: str, limit: float, duration: float, args: argparse.Namespace
) -> list[dict[str, float]]:
    """One exporter limit against a fresh simulator; per-window figures."""
    with common.Processes() as procs:
        sim_port, control_port, port = common.free_port(), common.free_port(), common.free_port()
        control = f"http://{common.HOST}:{control_port}"
        sim = procs.sim_server(
            f"ratelimit-{name}-simulator",
            port=sim_port,
            control_port=control_port,
            uploads=args.uploads,
            rate_limit=args.rate,
        )
        await common.wait_http(f"{control}/stats", within=60, process=sim)
        config = common.exporter_config(
            common.LOGS / f"ratelimit-{name}.yaml",
            base_url=f"http://{common.HOST}:{sim_port}",
            port=port,
            ingestion_ids=common.ids(args.uploads),
            max_rps=limit,
            concurrency=8,
            interval=1.0,
            timeout=5.0,
            log_level=args.log_level,
        )
        exporter = procs.exporter(f"ratelimit-{name}-exporter", config, args.source)
        url = f"http://{common.HOST}:{port}/metrics"
        await common.wait_http(f"http://{common.HOST}:{port}/readyz", within=60, process=exporter)
        common.note(f"{name}: exporter limit {limit:g}/s, simulator R={args.rate:g}/s")
        started = time.monotonic()
        points = []
        for i in range(round(duration / WINDOW) + 1):
            await asyncio.sleep(max(0.0, started + i * WINDOW - time.monotonic()))
            found = await common.metrics(url)
            points.append(
                {
                    "t": time.monotonic() - started,
                    "ok": common.total(found, "catalog_api_requests_total", code="200"),
                    "throttled": common.total(found, "catalog_api_requests_total", code="429"),
                    "all": common.total(found, "catalog_api_requests_total"),
                    "rate": common.total(found, "catalog_api_rate_limit_requests_per_second"),
                    "sim": await common.get_json(f"{control}/stats"),
                }
            )
        exporter.stop()
    windows = []
    for a, b in itertools.pairwise(points):
        dt = b["t"] - a["t"]
        sent = b["all"] - a["all"]
        windows.append(
            {
                "end_s": b["t"],
                "ok_per_s": (b["ok"] - a["ok"]) / dt,
                "throttled_per_s": (b["throttled"] - a["throttled"]) / dt,
                "share_429": (b["throttled"] - a["throttled"]) / sent if sent else 0.0,
                "other": sent - (b["ok"] - a["ok"]) - (b["throttled"] - a["throttled"]),
                "limiter_rate": b["rate"],
                "sim_ok_per_s": (
                    b["sim"]["by_status"].get("200", 0) - a["sim"]["by_status"].get("200", 0)
                )
                / dt,
            }
        )
    return windows


def plot(name: str, limit: float, rate: float, windows: list[dict[str, float]]) -> str:
    """Bars of successful requests/s per window, R marked with '|'; the 429 share after."""
    scale = 40 / (1.5 * rate)  # R sits at column 26
    mark = round(rate * scale)
    lines = [
        f"{name}: exporter limit {limit:g}/s, upstream R = {rate:g}/s "
        f"('#' = 200/s, '|' = R, then 429 share and the exporter's limiter rate)"
    ]
    for w in windows:
        bar = list("#" * min(60, round(w["ok_per_s"] * scale)))
        bar += [" "] * (mark + 1 - len(bar))
        bar[mark] = "|" if bar[mark] == " " else "+"
        lines.append(
            f"{w['end_s']:6.1f}s {''.join(bar):<62} {w['ok_per_s']:6.1f}/s "
            f"{100 * w['share_429']:5.1f}% 429  limiter {w['limiter_rate']:.1f}/s"
        )
    return "\n".join(lines)


def verdict(windows: list[dict[str, float]], rate: float) -> dict[str, Any]:
    """Figures over the windows after the first (the first includes start-up)."""
    steady = windows[1:] or windows
    ok = sum(w["ok_per_s"] for w in steady) / len(steady)
    sent = sum(w["ok_per_s"] + w["throttled_per_s"] for w in steady)
    share = sum(w["throttled_per_s"] for w in steady) / sent if sent else 0.0
    good = sum(1 for w in steady if w["ok_per_s"] >= 0.9 * rate and w["share_429"] < 0.02)
    return {
        "ok_per_s": ok,
        "ok_share_of_r": ok / rate,
        "share_429": share,
        "windows_meeting_target": f"{good}/{len(steady)}",
        "throttled_total": sum(w["throttled_per_s"] * WINDOW for w in windows),
    }


async def run(args: argparse.Namespace) -> None:
    """Both scenarios, tables, plot, summary."""
    duration = args.duration or (30.0 if args.quick else 60.0)
    under_duration = 15.0 if args.quick else 30.0
    runs = [
        ("3R", 3 * args.rate, duration),
        ("0.8R", 0.8 * args.rate, under_duration),
    ]
    plots = []
    summary: dict[str, Any] = {"quick": args.quick, "source": str(args.source), "R": args.rate}
    for name, limit, seconds in runs:
        windows = await scenario(name, limit, seconds, args)
        common.print_table(
            f"{name}: exporter limit {limit:g}/s vs upstream R = {args.rate:g}/s, "
            f"{args.uploads} uploads, {WINDOW:g}-s windows",
            ["end s", "200/s", "429/s", "429 share %", "other", "limiter rate", "sim 200/s"],
            [
                (
                    w["end_s"],
                    w["ok_per_s"],
                    w["throttled_per_s"],
                    100 * w["share_429"],
                    int(w["other"]),
                    w["limiter_rate"],
                    w["sim_ok_per_s"],
                )
                for w in windows
            ],
        )
        result = verdict(windows, args.rate)
        if name == "3R":
            met = result["ok_share_of_r"] >= 0.9 and result["share_429"] < 0.02
            print(
                f"3R after the first window: {result['ok_per_s']:.1f}/s successful "
                f"({result['ok_share_of_r']:.0%} of R), {result['share_429']:.1%} 429s; "
                f"windows meeting >= 90% R and < 2% 429: {result['windows_meeting_target']} "
                f"-> target {'met' if met else 'NOT met'}"
            )
        else:
            met = result["throttled_total"] == 0
            print(
                f"0.8R: {result['throttled_total']:.0f} 429s in {seconds:.0f} s, "
                f"{result['ok_per_s']:.1f}/s successful -> "
                f"{'zero 429s' if met else 'NOT zero 429s'}"
            )
        result["target_met"] = met
        summary[name] = result
        plots.append(plot(name, limit, args.rate, windows))
    common.OUTPUT.mkdir(parents=True, exist_ok=True)
    path = common.OUTPUT / "ratelimit.txt"
    path.write_text("\n\n".join(plots) + "\n", encoding="utf-8")
    print("\n" + "\n\n".join(plots))
    print(f"\nplot written to {path.relative_to(common.ROOT)}")
    common.emit_summary("ratelimit", common.rounded(summary, 3))


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20.0, help="the simulator's R, requests/s")
    p.add_argument("--uploads", type=int, default=500)
    p.add_argument("--duration", type=float, default=0, help="3R run, seconds (60; quick 30)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
