"""The Catalog API simulator in a process of its own, with a control listener for benchmarks.

`python bench/sim_server.py --port P --control-port C --uploads N [--rate-limit R]` serves
`exporter.simulator` on 127.0.0.1:P with N uploads "sim-000001"... whose status never changes
(half INQUEUE, half INPROGRESS: none becomes terminal, so polling never winds down), and on
127.0.0.1:C a JSON control API that drives the simulator's Python API:

    GET    /stats   {"total": ..., "by_status": {"200": ...}, "distinct_ids": ..., "faults": ...}
    POST   /faults  {"kind": "throttle"|"server_error_json"|"hang"|..., other Fault fields}
    DELETE /faults  clear every injected fault

It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from typing import Any

from aiohttp import web

from exporter.simulator import Fault, RequestRecord, SimulatedUpload, Simulator, create_app


def steady_uploads(n: int) -> list[SimulatedUpload]:
    """`n` uploads whose status stays what it is: odd ids INQUEUE, even ids INPROGRESS."""
    return [
        SimulatedUpload(f"sim-{i:06d}", [("INQUEUE" if i % 2 else "INPROGRESS", 0.0)])
        for i in range(1, n + 1)
    ]


class Stats:
    """Requests answered, by HTTP status ("none": hang or reset), and ids seen."""

    def __init__(self) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.ids: set[str] = set()

    def record(self, record: RequestRecord) -> None:
        """The simulator's on_request callback."""
        self.by_status[str(record.status) if record.status is not None else "none"] += 1
        if record.ingestion_id is not None:
            self.ids.add(record.ingestion_id)


def control_app(sim: Simulator, stats: Stats) -> web.Application:
    """The control listener's app."""
    faults = {"active": 0}

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total": sum(stats.by_status.values()),
                "by_status": dict(stats.by_status),
                "distinct_ids": len(stats.ids),
                "faults": faults["active"],
            }
        )

    async def add_fault(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        sim.inject(Fault(**body))
        faults["active"] += 1
        return web.json_response({"injected": body})

    async def clear_faults(request: web.Request) -> web.Response:
        sim.clear_faults()
        faults["active"] = 0
        return web.json_response({"cleared": True})

    app = web.Application()
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/faults", add_fault)
    app.router.add_delete("/faults", clear_faults)
    return app


async def serve(args: argparse.Namespace) -> None:
    """Serve both listeners until a signal."""
    stats = Stats()
    sim = Simulator(
        rate_limit=args.rate_limit if args.rate_limit > 0 else None,
        burst=args.burst,
        on_request=stats.record,
        max_records=1000,
    )
    sim.add_uploads(steady_uploads(args.uploads))
    runners = [
        web.AppRunner(create_app(sim), access_log=None, handle_signals=False),
        web.AppRunner(control_app(sim, stats), access_log=None, handle_signals=False),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for runner, port in zip(runners, (args.port, args.control_port), strict=True):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"sim_server ready: api {args.port}, control {args.control_port}", flush=True)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> int:
    """Parse the arguments and serve."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--uploads", type=int, default=1000)
    p.add_argument("--rate-limit", type=float, default=0.0, help="requests/s, 0: none")
    p.add_argument("--burst", type=float, default=None, help="bucket size (default: rate)")
    asyncio.run(serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
