"""Poll throughput: completed polls per second and CPU seconds per 1,000 polls.

The simulator (`python -m exporter.simulator --rate-limit 0 --uploads N`) and the exporter
(`python -m exporter --config ...`) run as separate processes, so the exporter's CPU time
(/proc/<pid>/stat utime + stime) is its own. The exporter's limit is set high and its
interval small, so that the rate limiter is not what bounds it. Polls are counted from the
exporter's own `catalog_api_requests_total` (all codes), sampled every few seconds. Then
py-spy samples the exporter for a while and the top functions are printed.

    .venv/bin/python bench/bench_throughput.py [--quick] [--no-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import common

SIM_NAME = "throughput-simulator"
EXPORTER_NAME = "throughput-exporter"


def check_config_limit(source: Path, base_url: str, max_rps: float) -> str:
    """What `--check-config` says about `max_requests_per_second: max_rps`."""
    path = common.exporter_config(
        common.LOGS / "throughput-check.yaml", base_url=base_url, port=0, max_rps=max_rps
    )
    done = subprocess.run(
        [common.PYTHON, "-m", "exporter", "--config", str(path), "--check-config"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(source)},
    )
    problems = [line.strip(" -") for line in done.stderr.splitlines() if "max_requests" in line]
    return f"exit {done.returncode}" + (f": {problems[0]}" if problems else "")


def answered(sim: common.Process) -> tuple[int, int]:
    """Requests the simulator has logged (--log-requests) so far: all, and 200s."""
    text = sim.log_path.read_text(encoding="utf-8", errors="replace")
    return text.count('"ingestion_id"'), text.count('"status": 200')


def sample(sim: common.Process, exporter_pid: int) -> dict[str, float]:
    """Polls so far, from the simulator's request log (so the exporter is not scraped while
    its CPU is measured), and both processes' CPU seconds, at one instant."""
    polls, ok = answered(sim)
    return {
        "t": time.monotonic(),
        "polls": polls,
        "ok": ok,
        "exporter_cpu": common.cpu_seconds(exporter_pid),
        "sim_cpu": common.cpu_seconds(sim.pid),
    }


async def measure(
    sim: common.Process, exporter_pid: int, duration: float, step: float
) -> list[dict[str, float]]:
    """Samples every `step` seconds over `duration`."""
    points = [sample(sim, exporter_pid)]
    end = points[0]["t"] + duration
    while time.monotonic() < end:
        await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))
        points.append(sample(sim, exporter_pid))
    return points


def totals(points: list[dict[str, float]]) -> dict[str, float]:
    """Window, polls, polls/s, exporter CPU and CPU per 1000 polls between first and last."""
    first, last = points[0], points[-1]
    wall = last["t"] - first["t"]
    polls = last["polls"] - first["polls"]
    cpu = last["exporter_cpu"] - first["exporter_cpu"]
    return {
        "wall": wall,
        "polls": polls,
        "per_second": polls / wall if wall > 0 else float("nan"),
        "cpu": cpu,
        "per_1000": 1000.0 * cpu / polls if polls else float("nan"),
        "sim_cpu": last["sim_cpu"] - first["sim_cpu"],
    }


async def run(args: argparse.Namespace) -> None:
    """Start both processes, measure, profile, sweep the limit downwards, report."""
    n = args.uploads or (1000 if args.quick else 2000)
    duration = args.duration or (10.0 if args.quick else 20.0)
    warmup = 3.0 if args.quick else 5.0
    step = 2.5 if args.quick else 5.0
    # Descending: a lowered limit applies at once, a raised one climbs back over 30 s.
    sweep = [] if args.quick else [r for r in (300.0, 100.0) if r < args.max_rps]
    profile_seconds = 0 if args.no_profile else (5 if args.quick else 10)
    with common.Processes() as procs:
        sim_port, port = common.free_port(), common.free_port()
        base_url = f"http://{common.HOST}:{sim_port}"
        sim = procs.start(
            SIM_NAME,
            [
                common.PYTHON,
                "-m",
                "exporter.simulator",
                "--port",
                str(sim_port),
                "--rate-limit",
                "0",
                "--uploads",
                str(n),
                "--seed",
                "1",
                "--log-requests",
            ],
            cwd=common.ROOT,
        )
        await common.wait_http(f"{base_url}/healthz", within=60, process=sim)
        config_path = common.LOGS / "throughput.yaml"

        def write_config(max_rps: float) -> None:
            common.exporter_config(
                config_path,
                base_url=base_url,
                port=port,
                ingestion_ids=common.ids(n),
                max_rps=max_rps,
                concurrency=args.concurrency,
                interval=args.interval,
                log_level=args.log_level,
            )

        write_config(args.max_rps)
        exporter = procs.exporter(EXPORTER_NAME, config_path, args.source)
        url = f"http://{common.HOST}:{port}"
        await common.wait_http(f"{url}/readyz", within=120, process=exporter)
        common.note(f"exporter ready ({n} uploads); warming up {warmup:.0f} s")
        await asyncio.sleep(warmup)
        points = await measure(sim, exporter.pid, duration, step)
        common.note(f"measured {duration:.0f} s")
        rows = []
        for a, b in itertools.pairwise(points):
            dt = b["t"] - a["t"]
            rows.append(
                (
                    round(b["t"] - points[0]["t"], 1),
                    (b["polls"] - a["polls"]) / dt,
                    (b["ok"] - a["ok"]) / dt,
                    100.0 * (b["exporter_cpu"] - a["exporter_cpu"]) / dt,
                    100.0 * (b["sim_cpu"] - a["sim_cpu"]) / dt,
                )
            )
        common.print_table(
            f"Poll throughput, {n} uploads, interval {args.interval} s, "
            f"max_requests_per_second {args.max_rps:g}, max_concurrency {args.concurrency}",
            ["t s", "polls/s", "200/s", "exporter CPU %", "simulator CPU %"],
            rows,
        )
        main = totals(points)
        common.print_table(
            "Sustained (polls counted by the simulator)",
            ["window s", "polls", "polls/s", "exporter CPU s", "CPU s / 1000 polls", "sim CPU s"],
            [
                (
                    main["wall"],
                    int(main["polls"]),
                    main["per_second"],
                    main["cpu"],
                    main["per_1000"],
                    main["sim_cpu"],
                )
            ],
        )
        busy = main["cpu"] / main["wall"] if main["wall"] else float("nan")
        if main["per_second"] >= 0.95 * args.max_rps:
            bound = "the configured rate limit"
        elif busy >= 0.9:
            bound = "the exporter's CPU (one core)"
        else:
            bound = "neither CPU nor the configured limit: the pacing itself (see the sweep)"
        print(f"what bounds it: {bound}; exporter CPU {busy:.0%} of one core")
        limit_5000 = check_config_limit(args.source, base_url, 5000)
        print(f"max_requests_per_second: 5000 -> {limit_5000}")

        profile_summary = None
        if profile_seconds:
            common.note(f"profiling the exporter for {profile_seconds} s with py-spy")
            raw = await common.profile(exporter.pid, profile_seconds, "profile-throughput")
            if raw is not None:
                profile_summary = common.print_profile(
                    raw, "Exporter profile while polling", profile_seconds
                )
        sweep_rows = []
        for max_rps in sweep:
            write_config(max_rps)
            exporter.popen.send_signal(signal.SIGHUP)
            await asyncio.sleep(2.0)
            got = totals(await measure(sim, exporter.pid, 10.0, 10.0))
            sweep_rows.append(
                (max_rps, got["per_second"], got["per_second"] / max_rps, got["per_1000"])
            )
        if sweep_rows:
            rps = main["per_second"]
            sweep_rows.insert(0, (args.max_rps, rps, rps / args.max_rps, main["per_1000"]))
            common.print_table(
                "Configured limit vs polls/s achieved (SIGHUP reload, 10 s each)",
                ["max_requests_per_second", "polls/s", "achieved share", "CPU s / 1000 polls"],
                sweep_rows,
            )

        code = exporter.stop()
        if code != 0:
            print(f"note: exporter exited {code}")
    common.emit_summary(
        "throughput",
        common.rounded(
            {
                "quick": args.quick,
                "source": str(args.source),
                "uploads": n,
                "interval_s": args.interval,
                "max_rps": args.max_rps,
                "max_concurrency": args.concurrency,
                "window_s": main["wall"],
                "polls_per_s": main["per_second"],
                "exporter_cpu_s_per_1000_polls": main["per_1000"],
                "exporter_cpu_share": busy,
                "simulator_cpu_share": main["sim_cpu"] / main["wall"] if main["wall"] else None,
                "max_rps_5000": limit_5000,
                "sweep": [[r, s] for r, s, _, _ in sweep_rows],
                **(profile_summary or {}),
            },
            3,
        ),
    )


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=0, help="default 2000 (quick 1000)")
    p.add_argument("--duration", type=float, default=0, help="seconds measured (20; quick 10)")
    p.add_argument("--max-rps", type=float, default=1000, help="the config's ceiling is 1000")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--no-profile", action="store_true")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
