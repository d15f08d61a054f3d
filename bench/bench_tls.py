"""TLS scrape cost: GET /metrics over HTTPS with basic auth against plain HTTP, same run.

Four processes on loopback: bench/sim_server.py (N steady uploads, no rate limit), two
exporters with the same config polling it (`max_requests_per_second` each, interval 1 s),
one plain, one with a web config (`--web.config.file`: a certificate made here by a CA of its
own, ECDSA P-256, TLS 1.2-1.3, and basic auth with a bcrypt hash of cost 10, as
`htpasswd -nBC 10` writes). This process scrapes both alternately, as Prometheus does: one
kept-alive connection per target (the TLS target verifies the CA and sends the password;
after the first, each scrape is a cache hit of the auth cache, no bcrypt), gzip first, then
identity. A last scenario opens a new connection for every scrape (a TLS handshake each).
Latency is send to last byte, body not decompressed; CPU is each exporter's, per scrape.

    .venv/bin/python bench/bench_tls.py [--quick] [--uploads 100000] [--scrapes K]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import common

USER, PASSWORD = "prometheus", "bench-scrape-password"


def make_certificates(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 in `directory`; the CA file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exporter")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(common.HOST))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    (directory / "web-config.yml").write_text(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n"
        f"basic_auth_users:\n  {USER}: '{hashed}'\n"
    )
    return directory / "ca.pem"


async def timed(s: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> common.Scrape:
    started = time.perf_counter()
    async with s.get(url, headers=headers) as r:
        body = await r.read()
        if r.status != 200:
            msg = f"{url} answered {r.status}"
            raise RuntimeError(msg)
        encoding = r.headers.get("Content-Encoding", "")
    return common.Scrape(time.perf_counter() - started, len(body), r.status, b"", encoding)


async def measure(
    targets: dict[str, tuple[str, dict[str, str], common.Process]],
    sessions: dict[str, aiohttp.ClientSession] | None,
    context: ssl.SSLContext,
    count: int,
    pause: float,
) -> dict[str, dict[str, Any]]:
    """`count` scrapes of each target, alternated; None sessions: a new connection each."""
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    sizes: dict[str, int] = {}
    cpu = {name: common.cpu_seconds(proc.pid) for name, (_, _, proc) in targets.items()}
    for _ in range(count):
        for name, (url, headers, _) in targets.items():
            if sessions is not None:
                result = await timed(sessions[name], url, headers)
            else:
                connector = aiohttp.TCPConnector(ssl=context, force_close=True)
                async with common.session(connector=connector) as s:
                    result = await timed(s, url, headers)
            seconds[name].append(result.seconds)
            sizes[name] = result.size
            await asyncio.sleep(pause)
    return {
        name: {
            **common.stats(seconds[name]),
            "bytes": sizes[name],
            "cpu_ms_per_scrape": 1000
            * (common.cpu_seconds(proc.pid) - cpu[name])
            / len(seconds[name]),
        }
        for name, (_, _, proc) in targets.items()
    }


async def run(args: argparse.Namespace) -> None:
    n = args.uploads or (10_000 if args.quick else 100_000)
    count = args.scrapes or (10 if args.quick else 60)
    directory = common.OUTPUT / "tls"
    ca_file = make_certificates(directory)
    context = ssl.create_default_context(cafile=str(ca_file))
    auth = {"Authorization": aiohttp.encode_basic_auth(USER, PASSWORD)}
    rows: list[tuple[object, ...]] = []
    summary: dict[str, Any] = {"uploads": n, "scrapes": count}
    with common.Processes() as procs:
        base = await procs.running_sim_server(f"tls-{n}-simulator", uploads=n)
        exporters: dict[str, tuple[str, common.Process]] = {}
        for name, web in (("http", None), ("https", directory / "web-config.yml")):
            port = common.free_port()
            sections = {"server": {"web_config_file": str(web)}} if web is not None else None
            config = common.exporter_config(
                common.LOGS / f"tls-{n}-{name}.yaml",
                base_url=base,
                port=port,
                ingestion_ids=common.ids(n),
                max_rps=args.max_rps,
                log_level=args.log_level,
                sections=sections,
            )
            proc = procs.exporter(f"tls-{n}-{name}", config, args.source)
            exporters[name] = (f"{name}://{common.HOST}:{port}/metrics", proc)
        connector = aiohttp.TCPConnector(ssl=context)
        async with common.session() as plain, common.session(connector=connector) as tls:
            sessions = {"http": plain, "https": tls}
            for name, (url, proc) in exporters.items():
                ready = url.replace("/metrics", "/readyz")
                deadline = time.monotonic() + 600
                while True:
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
                    try:
                        async with sessions[name].get(ready) as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(ready)
                    await asyncio.sleep(0.1)
            common.note(f"{n} uploads: both exporters ready; warming up {args.warmup:.0f} s")
            await asyncio.sleep(args.warmup)
            for headers_name, headers in (("gzip", common.GZIP), ("identity", common.IDENTITY)):
                targets = {
                    name: (url, {**headers, **(auth if name == "https" else {})}, proc)
                    for name, (url, proc) in exporters.items()
                }
                for name, (url, target_headers, _) in targets.items():  # first scrapes
                    await timed(sessions[name], url, target_headers)
                found = await measure(targets, sessions, context, count, args.pause)
                rows += [(headers_name, "kept alive", k, *_cells(v)) for k, v in found.items()]
                summary[headers_name] = found
                common.note(f"{n}: {headers_name} done")
        targets = {
            name: (url, {**common.GZIP, **(auth if name == "https" else {})}, proc)
            for name, (url, proc) in exporters.items()
        }
        found = await measure(targets, None, context, max(5, count // 3), args.pause)
        rows += [("gzip", "new connection", k, *_cells(v)) for k, v in found.items()]
        summary["gzip_new_connection"] = found
    common.print_table(
        f"GET /metrics at {n:,} uploads, HTTPS + basic auth against HTTP (seconds)",
        [
            "encoding",
            "connection",
            "target",
            "n",
            "median",
            "p90",
            "p99",
            "max",
            "MB",
            "CPU ms (with polls)",
        ],
        rows,
    )
    for key in ("gzip", "identity", "gzip_new_connection"):
        summary[f"{key}_https_over_http_median"] = (
            summary[key]["https"]["median"] / summary[key]["http"]["median"]
        )
    common.emit_summary("tls", common.rounded(summary, 4))


def _cells(row: dict[str, Any]) -> tuple[object, ...]:
    return (
        row["n"],
        row["median"],
        row["p90"],
        row["p99"],
        row["max"],
        row["bytes"] / 1e6,
        row["cpu_ms_per_scrape"],
    )


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=0, help="tracked uploads (100000; quick 10000)")
    p.add_argument("--scrapes", type=int, default=0, help="scrapes per target and scenario")
    p.add_argument("--pause", type=float, default=0.25, help="seconds between scrapes")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of polling first")
    p.add_argument("--max-rps", type=float, default=200.0, help="each exporter's API request rate")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
