"""The signing proxy's cost: latency it adds (direct vs proxied, same run) and its throughput.

Three processes: the simulator (`python -m exporter.simulator --auth sigv4`, no rate limit),
the exporter with `proxy.enabled` (SigV4 with the simulator's test key, from the
environment, as a pod's credentials would be), and this client. Latency: `--requests`
sequential requests per path, alternating direct (signed here, the signing not timed: the
direct figure is the bare exchange, so the added figure includes the proxy's signing) and
through the proxy (unsigned), so both see the same machine at the same moment. Paths:
getCatalogUploadStatus for a known id (forwarding and signing only) and /v1/catalog/upload
(the id registered before the answer, then polled by the exporter: the full cost).
Throughput: `--clients` concurrent clients uploading through the proxy for `--seconds`, and the
same straight to the simulator.

    .venv/bin/python bench/bench_proxy.py [--quick] [--requests 2000] [--clients 16]
        [--seconds 10]
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from botocore.credentials import Credentials

import common
from exporter.auth import SigV4Auth
from exporter.simulator import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY

STATUS = "/v1/catalog/getCatalogUploadStatus"
UPLOAD = "/v1/catalog/upload"
KNOWN_ID = "demo-stuck-inqueue"
#: The simulator checks SigV4 as the API does, and never throttles: the client is the limit.
SIM_OPTIONS = ("--auth", "sigv4", "--rate-limit", "0")
#: The target of issue 24: at most 2 ms added at the median, on 2 cores.
TARGET_ADDED_P50_MS = 2.0


class Client:
    """Times one POST, direct (signed here, untimed) or through the proxy (unsigned)."""

    def __init__(self, session: aiohttp.ClientSession, api: str, proxy: str) -> None:
        self._session = session
        self._api = api
        self._proxy = proxy
        self._auth = SigV4Auth(
            region=TEST_REGION,
            credentials=Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY),
        )

    async def post(self, path: str, body: bytes, *, direct: bool) -> float:
        headers = {"Content-Type": "application/json"}
        url = (self._api if direct else self._proxy) + path
        if direct:
            headers.update(await self._auth.headers("POST", url, body, headers))
        started = time.perf_counter()
        async with self._session.post(url, data=body, headers=headers) as answer:
            await answer.read()
            if answer.status != 200:
                msg = f"{'direct' if direct else 'proxied'} {path}: {answer.status}"
                raise RuntimeError(msg)
        return time.perf_counter() - started


async def latencies(client: Client, path: str, body: bytes, n: int) -> dict[str, list[float]]:
    """`n` exchanges each way, alternating, after a short warm-up."""
    for _ in range(20):
        await client.post(path, body, direct=True)
        await client.post(path, body, direct=False)
    found: dict[str, list[float]] = {"direct": [], "proxied": []}
    for i in range(2 * n):
        direct = i % 2 == 0
        found["direct" if direct else "proxied"].append(
            await client.post(path, body, direct=direct)
        )
    return found


async def throughput(client: Client, clients: int, seconds: float, *, direct: bool) -> float:
    """Uploads per second with `clients` concurrent clients for `seconds`."""
    done = 0
    deadline = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await client.post(UPLOAD, b'{"feed": "bench"}', direct=direct)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(clients)))
    return done / (time.monotonic() - started)


async def run(args: Any) -> None:
    """Simulator and exporter as processes, then the two measurements."""
    n = 300 if args.quick else args.requests
    seconds = 3.0 if args.quick else args.seconds
    with common.Processes() as procs:
        sim_port = common.free_port()
        sim = procs.start(
            "proxy-simulator",
            [common.PYTHON, "-m", "exporter.simulator", "--port", str(sim_port), *SIM_OPTIONS],
            cwd=common.ROOT,
        )
        api = f"http://{common.HOST}:{sim_port}"
        await common.wait_http(f"{api}/healthz", within=60, process=sim)
        port, proxy_port = common.free_port(), common.free_port()
        config = common.exporter_config(
            common.LOGS / "proxy.yaml",
            base_url=api,
            port=port,
            max_rps=10_000,
            interval=3600.0,
            log_level=args.log_level,
            sections={
                "api": {"auth": {"type": "sigv4", "region": TEST_REGION}},
                "proxy": {"enabled": True, "host": common.HOST, "port": proxy_port},
            },
        )
        exporter = procs.start(
            "proxy-exporter",
            [common.PYTHON, "-m", "exporter", "--config", str(config)],
            cwd=args.source,
            env={
                "PYTHONPATH": str(args.source),
                "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
                "AWS_REGION": TEST_REGION,
            },
        )
        await common.wait_http(f"http://{common.HOST}:{port}/readyz", within=60, process=exporter)
        proxy = f"http://{common.HOST}:{proxy_port}"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = Client(session, api, proxy)
            status_body = json.dumps({"ingestionId": KNOWN_ID}).encode()
            by_path = {
                "getCatalogUploadStatus": await latencies(client, STATUS, status_body, n),
                "upload (registered)": await latencies(client, UPLOAD, b'{"feed": 1}', n),
            }
            direct_rps = await throughput(client, args.clients, seconds, direct=True)
            proxied_rps = await throughput(client, args.clients, seconds, direct=False)
        tracked = await common.metrics(f"http://{common.HOST}:{port}/metrics")
    rows = []
    summary: dict[str, Any] = {"requests": n, "clients": args.clients, "seconds": seconds}
    for name, found in by_path.items():
        d, p = common.stats(found["direct"]), common.stats(found["proxied"])
        added50 = (p["median"] - d["median"]) * 1000
        added99 = (p["p99"] - d["p99"]) * 1000
        rows.append(
            [
                name,
                round(d["median"] * 1000, 2),
                round(p["median"] * 1000, 2),
                round(added50, 2),
                round(d["p99"] * 1000, 2),
                round(p["p99"] * 1000, 2),
                round(added99, 2),
                "yes" if added50 <= TARGET_ADDED_P50_MS else "no",
            ]
        )
        summary[name] = {"added_p50_ms": round(added50, 3), "added_p99_ms": round(added99, 3)}
    common.print_table(
        f"Latency added by the proxy, {n} requests each way, alternating (ms)",
        [
            "path",
            "direct p50",
            "proxied p50",
            "added p50",
            "direct p99",
            "proxied p99",
            "added p99",
            f"p50 ≤ {TARGET_ADDED_P50_MS:g} ms",
        ],
        rows,
    )
    registered = common.total(tracked, "catalog_exporter_proxy_answers_total", outcome="registered")
    common.print_table(
        f"Upload throughput, {args.clients} clients for {seconds:g} s (requests/s)",
        ["direct", "through the proxy", "ids registered by the proxy"],
        [[round(direct_rps), round(proxied_rps), int(registered)]],
    )
    summary.update(direct_rps=round(direct_rps), proxied_rps=round(proxied_rps))
    common.emit_summary("proxy", summary)


def main() -> None:
    """Parse the options and run."""
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per path and way")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
