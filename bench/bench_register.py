"""Durable registrations: acknowledged POSTs per second from concurrent admin-API clients.

The exporter runs with the state database on (`state.path`), against bench/sim_server.py;
`--clients` aiohttp clients each POST new ids to /api/v1/ingestions for `--seconds`. A 2xx
means the registration was committed (group commit in one writer thread). After SIGTERM the
database is opened and every acknowledged id must be in it: the figure counts only what was
durable. The exporter polls at the shipped sidecar's `--max-rps` (5; the API allows about 10),
so that polling the new ids takes what it would in a deployment, not the whole loop.

    .venv/bin/python bench/bench_register.py [--quick] [--clients 50] [--seconds 10] [--max-rps 5]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

import common
from exporter.state import open_store


async def hammer(url: str, clients: int, seconds: float) -> tuple[list[str], list[float], int]:
    """POST new ids from `clients` concurrent clients; acknowledged ids, latencies, refusals."""
    acknowledged: list[str] = []
    latencies: list[float] = []
    refused = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def client(c: int) -> None:
            nonlocal refused
            n = 0
            while time.monotonic() < deadline:
                n += 1
                ingestion_id = f"bench-reg-{c:03d}-{n:07d}"
                started = time.monotonic()
                async with s.post(url, json={"ingestionId": ingestion_id}) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        acknowledged.append(ingestion_id)
                        latencies.append(time.monotonic() - started)
                    else:
                        refused += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
    return acknowledged, latencies, refused


async def run(args: Any) -> None:
    """One exporter, one burst of registrations, then the database checked."""
    seconds = 3.0 if args.quick else args.seconds
    with common.Processes() as procs:
        base_url = await procs.running_sim_server("register-simulator", uploads=1000, within=60)
        port, admin_port = common.free_port(), common.free_port()
        state = common.LOGS / "register-state" / "state.db"
        state.parent.mkdir(parents=True, exist_ok=True)
        for stale in state.parent.glob("state.db*"):
            stale.unlink()
        config = common.exporter_config(
            common.LOGS / "register.yaml",
            base_url=base_url,
            port=port,
            state_path=state,
            max_rps=args.max_rps,
            concurrency=4,
            interval=60.0,
            log_level=args.log_level,
            sections={
                "admin": {"enabled": True, "host": common.HOST, "port": admin_port},
                "ingestions": {"max_tracked": 1_000_000},
            },
        )
        exporter = procs.exporter("register-exporter", config, args.source)
        await common.wait_http(
            f"http://{common.HOST}:{admin_port}/healthz", within=60, process=exporter
        )
        url = f"http://{common.HOST}:{admin_port}/api/v1/ingestions"
        started = time.monotonic()
        acknowledged, latencies, refused = await hammer(url, args.clients, seconds)
        elapsed = time.monotonic() - started
        code = exporter.stop(grace=60)
    store, result = open_store(state)
    assert store is not None, result.problem
    stored = {record.ingestion_id for record in result.snapshot.uploads}
    store.close()
    missing = len(set(acknowledged) - stored)
    lat = common.stats(latencies)
    common.print_table(
        f"Durable registrations, {args.clients} clients for {seconds:g} s (state.path on)",
        [
            "acknowledged",
            "per second",
            "refused",
            "p50 ms",
            "p99 ms",
            "max ms",
            "missing after stop",
            "exit",
        ],
        [
            [
                len(acknowledged),
                round(len(acknowledged) / elapsed),
                refused,
                round(lat["median"] * 1000, 1),
                round(lat["p99"] * 1000, 1),
                round(lat["max"] * 1000, 1),
                missing,
                code,
            ]
        ],
    )
    common.emit_summary(
        "register",
        {
            "max_rps": args.max_rps,
            "acknowledged": len(acknowledged),
            "per_second": len(acknowledged) / elapsed,
            "missing": missing,
            "latency": lat,
        },
    )


def main() -> None:
    """Command line."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-rps", type=float, default=5.0, help="the shipped sidecar's budget")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
