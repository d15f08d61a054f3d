"""The shipped sidecar under its own resource limits, with N tracked uploads.

The image (`--image`; by default the one `make test` builds) runs with podman the way the
kustomize component runs it: read-only root, no capabilities, user 65532, and the CPU and
memory limits of deploy/components/sidecar/sidecar.yaml (`--cpus`/`--memory` override them).
Its config is the component's own exporter-config.yaml with N ids added, the Catalog API
pointed at bench/sim_server.py on the host's loopback (auth none), and the state database
and the watched directory on host directories (the pod's emptyDirs). Polling stays at the
sidecar's 5 requests/s.

Measured per size: when /healthz and /readyz first answer after `podman run` (the startup
probe allows 60 s); then for `--seconds`, /healthz every second as the liveness probe asks
it (a 2 s timeout: a slower answer counts as a failed probe) and a gzip scrape every 15 s;
then the exporter's CPU (process_cpu_seconds_total), the share of its event loop's ticks more
than 100 ms late (what CatalogExporterEventLoopLagging watches: it fires when over 1% are,
for 15 minutes), the share of CFS periods in which the container was throttled, its resident
memory, the container's peak memory (cgroup), and whether it was OOM-killed.

    .venv/bin/python bench/bench_sidecar.py [--quick] [--sizes 10000,40000,100000]
        [--seconds 60] [--image localhost/catalog-upload-exporter:test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

import common

SIDECAR = common.ROOT / "deploy" / "components" / "sidecar"
IMAGE = "localhost/catalog-upload-exporter:test"
#: Podman as the container tests run it (tests/test_container.py): runc, rlimits set.
PODMAN = ("podman", "--runtime", "runc")
ULIMITS = ("--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024")
#: The liveness probe's timeout and the scrape interval used here.
PROBE_TIMEOUT_SECONDS = 2.0
SCRAPE_EVERY_SECONDS = 15.0
LAG = "catalog_exporter_event_loop_lag_seconds"
#: What the container's cgroup says (v1 paths, then v2), read inside it.
CGROUP_READER = """
import pathlib
def first(*paths):
    for p in paths:
        f = pathlib.Path('/sys/fs/cgroup', p)
        if f.exists():
            return f.read_text().strip()
    return ''
print(first('memory/memory.max_usage_in_bytes', 'memory.peak') or 0)
stat = dict(line.split() for line in first('cpu/cpu.stat', 'cpu.stat').splitlines())
print(stat.get('nr_periods', 0), stat.get('nr_throttled', 0))
"""


def shipped_limits() -> tuple[str, str]:
    """The sidecar's CPU and memory limits, as the component ships them."""
    patch = yaml.safe_load((SIDECAR / "sidecar.yaml").read_text(encoding="utf-8"))
    containers = patch["spec"]["template"]["spec"]["initContainers"]
    limits = next(c for c in containers if c["name"] == "catalog-upload-exporter")["resources"]
    return str(limits["limits"]["cpu"]), str(limits["limits"]["memory"])


def cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity ("200m", "1") as podman's --cpus ("0.2", "1")."""
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity


def memory(quantity: str) -> str:
    """A Kubernetes memory quantity ("192Mi") as podman's --memory ("192m")."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + unit
    return quantity


def sidecar_config(path: Path, *, base_url: str, port: int, ids: list[str]) -> Path:
    """The component's exporter config with `ids`, the simulator and loopback ports."""
    config = yaml.safe_load((SIDECAR / "exporter-config.yaml").read_text(encoding="utf-8"))
    config["api"]["base_url"] = base_url
    config["api"]["auth"] = {"type": "none"}
    config["ingestions"]["ids"] = ids
    config["server"].update(host=common.HOST, port=port)
    config["admin"].update(port=common.free_port())
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(config, f, Dumper=dumper, sort_keys=False)
    path.chmod(0o644)
    return path


def podman(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, check=False, timeout=120
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {args[0]} failed: {result.stderr.strip()}")
    return result.stdout.strip()


async def first_ok(s: aiohttp.ClientSession, url: str, started: float, within: float) -> float:
    """Seconds from `started` until `url` answers 200."""
    while time.monotonic() - started < within:
        try:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)) as r:
                await r.read()
                if r.status == 200:
                    return time.monotonic() - started
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {within} s")


async def probe(s: aiohttp.ClientSession, url: str) -> float | None:
    """One liveness probe: its seconds, or None if it failed or took over the timeout."""
    started = time.perf_counter()
    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)) as r:
            await r.read()
            return time.perf_counter() - started if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def measure(name: str, url: str, seconds: float, started: float) -> dict[str, Any]:
    """Start-up, then probes and scrapes for `seconds`, then the container's counters."""
    result: dict[str, Any] = {}
    async with common.session() as s:
        result["healthz_s"] = await first_ok(s, f"{url}/healthz", started, 120)
        result["readyz_s"] = await first_ok(s, f"{url}/readyz", started, 120)
        before = common.samples((await common.scrape(s, f"{url}/metrics")).body.decode(), [""])
        scrapes: list[float] = []
        window = time.monotonic()
        deadline = window + seconds

        async def scraping() -> None:
            while (began := time.monotonic()) < deadline:
                scrapes.append((await common.scrape(s, f"{url}/metrics", common.GZIP)).seconds)
                pause = SCRAPE_EVERY_SECONDS - (time.monotonic() - began)
                await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))

        # As the kubelet does: a probe a second whatever the scrapes do, each on its own.
        scraper = asyncio.create_task(scraping())
        probing: list[asyncio.Task[float | None]] = []
        while time.monotonic() < deadline:
            probing.append(asyncio.create_task(probe(s, f"{url}/healthz")))
            await asyncio.sleep(1.0)
        probes = await asyncio.gather(*probing)
        await scraper
        elapsed = time.monotonic() - window
        after = common.samples((await common.scrape(s, f"{url}/metrics")).body.decode(), [""])
    answered = [p for p in probes if p is not None]
    ticks = after.get(f"{LAG}_count", 0.0) - before.get(f"{LAG}_count", 0.0)
    on_time = after.get(f'{LAG}_bucket{{le="0.1"}}', 0.0) - before.get(
        f'{LAG}_bucket{{le="0.1"}}', 0.0
    )
    cpu = after.get("process_cpu_seconds_total", 0.0) - before.get("process_cpu_seconds_total", 0.0)
    peak, periods = podman("exec", name, "/opt/venv/bin/python", "-c", CGROUP_READER).splitlines()
    nr_periods, nr_throttled = (int(x) for x in periods.split())
    result.update(
        probes=len(probes),
        failed_probes=len(probes) - len(answered),
        healthz=common.stats(answered),
        scrapes=common.stats(scrapes),
        cpu_pct=100 * cpu / elapsed,
        late_ticks_pct=100 * (ticks - on_time) / ticks if ticks else 0.0,
        throttled_pct=100 * nr_throttled / nr_periods if nr_periods else 0.0,
        rss_mib=after.get("process_resident_memory_bytes", 0.0) / 2**20,
        peak_mib=int(peak) / 2**20,
        polled=common.total(after, "catalog_api_requests_total"),
        oom_killed=podman("inspect", "--format={{.State.OOMKilled}}", name) == "true",
    )
    return result


async def run_size(
    n: int, args: argparse.Namespace, base_url: str, limits: tuple[str, str]
) -> dict[str, Any]:
    """One container with `n` ids, measured, then removed."""
    work = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    name = f"bench-sidecar-{uuid.uuid4().hex[:8]}"
    try:
        port = common.free_port()
        config = sidecar_config(
            work / "config.yaml", base_url=base_url, port=port, ids=common.ids(n)
        )
        for directory in ("state", "ingestions"):
            (work / directory).mkdir()
            os.chown(work / directory, 65532, 65532)
        common.note(f"{n} ids: starting the container ({limits[0]} CPU, {limits[1]})")
        started = time.monotonic()
        podman(
            "run", "--detach", f"--name={name}", "--network=host",
            "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--user=65532:65532", "--read-only-tmpfs=false", "--tmpfs=/tmp", *ULIMITS,
            f"--cpus={cpus(limits[0])}", f"--memory={memory(limits[1])}",
            f"--volume={config}:/etc/catalog-upload-exporter/config.yaml:ro",
            f"--volume={work / 'state'}:/var/lib/catalog-upload-exporter",
            f"--volume={work / 'ingestions'}:/var/run/catalog-ingestions",
            args.image,
        )  # fmt: skip
        try:
            result = await measure(name, f"http://{common.HOST}:{port}", args.seconds, started)
        except TimeoutError:
            state = podman(
                "inspect",
                "--format={{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                name,
                check=False,
            ).split()
            result = {
                "error": f"no 200: container {state[0]}, exit code {state[1]}",
                "oom_killed": state[2:] == ["true"],
            }
            common.note(f"{result['error']}; its last lines:")
            print(podman("logs", "--tail=5", name, check=False), flush=True)
        podman("stop", "--time=30", name, check=False)
        result["stop_exit"] = podman("inspect", "--format={{.State.ExitCode}}", name, check=False)
        return result
    finally:
        podman("rm", "--force", "--time=0", name, check=False)
        shutil.rmtree(work, ignore_errors=True)


async def run(args: argparse.Namespace) -> None:
    shipped = shipped_limits()
    limits = (args.cpus or shipped[0], args.memory or shipped[1])
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([10_000] if args.quick else [10_000, 40_000, 100_000])
    )
    results: dict[int, dict[str, Any]] = {}
    with common.Processes() as procs:
        base_url = await procs.running_sim_server("sidecar-simulator", uploads=max(sizes))
        for n in sizes:
            results[n] = await run_size(n, args, base_url, limits)
    rows = []
    for n, r in results.items():
        if "error" in r:
            rows.append((n, r["error"], *[""] * 10, r["oom_killed"], ""))
            continue
        rows.append(
            (
                n,
                r["healthz_s"],
                r["readyz_s"],
                1000 * r["healthz"]["median"],
                1000 * r["healthz"]["max"],
                f"{r['failed_probes']}/{r['probes']}",
                1000 * r["scrapes"]["median"],
                1000 * r["scrapes"]["max"],
                r["cpu_pct"],
                r["late_ticks_pct"],
                r["throttled_pct"],
                r["rss_mib"],
                r["oom_killed"],
                r["peak_mib"],
            )
        )
    common.print_table(
        f"The sidecar under its limits ({limits[0]} CPU, {limits[1]} memory), "
        f"{args.seconds:g} s: /healthz every 1 s (2 s timeout), a gzip scrape every "
        f"{SCRAPE_EVERY_SECONDS:g} s",
        [
            "uploads",
            "/healthz s",
            "/readyz s",
            "probe p50 ms",
            "max",
            "failed",
            "scrape p50 ms",
            "max",
            "CPU % of a core",
            "ticks > 100 ms %",
            "throttled % of periods",
            "RSS MiB",
            "OOM-killed",
            "cgroup peak MiB",
        ],
        rows,
    )
    common.emit_summary(
        "sidecar",
        {"image": args.image, "limits": limits, "seconds": args.seconds, "results": results},
    )


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="", help="comma-separated numbers of tracked uploads")
    p.add_argument("--seconds", type=float, default=60.0, help="measuring window per size")
    p.add_argument("--image", default=IMAGE, help=f"the image to run (default {IMAGE})")
    p.add_argument("--cpus", default="", help="a CPU limit instead of the sidecar's (e.g. 1)")
    p.add_argument("--memory", default="", help="a memory limit instead (e.g. 512Mi)")
    args = p.parse_args()
    if subprocess.run([*PODMAN, "image", "exists", args.image], check=False).returncode:
        raise SystemExit(f"no image {args.image}: `make test` builds it (or pass --image)")
    if args.quick:
        args.seconds = min(args.seconds, 20.0)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
