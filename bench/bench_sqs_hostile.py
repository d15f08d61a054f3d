"""SQS under issue 20's conditions: a foreign-shard backlog ahead of own messages, and reloads.

moto's SQS server, bench/sim_server.py and the exporter run as processes of their own
(`polling.interval_seconds: 600`, so a poll after the first one is a triggered one). Two runs:

- shards: the exporter is shard 0 of 2 and shard 1 is down. 1,000 messages naming ids shard 1
  owns are sent, then 5 naming ids of shard 0 (FATAL notifications for the live replica): the
  time from the 5th own message sent to 5 of them handled (`triggered`, `merged` or
  `terminal` counted on /metrics; given up after `--give-up` seconds);
- reloads: 40 reloads (config rewritten, SIGHUP, 0.1 s apart), each changing
  notifications.sqs (wait_seconds 20 and 19 in turn): the process's threads and RSS before,
  right after, and 30 s after (once every old long poll has ended); then one message naming a
  tracked id, and the time until it is counted as handled.

    .venv/bin/python bench/bench_sqs_hostile.py [--quick] [--source DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

import common

REGION = "us-east-1"


def sqs_client(endpoint: str) -> Any:
    """The sender's botocore client (fake credentials: moto checks none)."""
    session = botocore.session.Session()
    session.set_credentials("AKIABENCH", "bench-secret")
    return session.create_client(
        "sqs",
        region_name=REGION,
        endpoint_url=endpoint,
        config=botocore.config.Config(retries={"total_max_attempts": 1}, max_pool_connections=4),
    )


def send(client: Any, queue_url: str, ids: list[str]) -> None:
    """One raw FATAL message per id, in batches of ten, in order."""
    for start in range(0, len(ids), 10):
        entries = [
            {
                "Id": str(n),
                "MessageBody": json.dumps({"ingestionId": i, "processingStatus": "FATAL"}),
            }
            for n, i in enumerate(ids[start : start + 10])
        ]
        client.send_message_batch(QueueUrl=queue_url, Entries=entries)


def shard_of(ingestion_id: str, total: int) -> int:
    """exporter.sharding.shard_of, imported from the package under test."""
    from exporter.sharding import shard_of as owner

    return owner(ingestion_id, total)


def start_exporter(
    procs: common.Processes, name: str, config: Path, source: Path
) -> common.Process:
    """`python -m exporter`, with AWS credentials the default chain finds (moto takes any)."""
    return procs.start(
        name,
        [common.PYTHON, "-m", "exporter", "--config", str(config)],
        cwd=source,
        env={
            "PYTHONPATH": str(source),
            "AWS_ACCESS_KEY_ID": "AKIABENCH",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
        },
    )


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


async def triggered(url: str) -> float:
    found = await common.metrics(url)
    return sum(
        common.total(found, "catalog_exporter_notifications_total", outcome=outcome)
        # An id handled here: polled now, merged into a poll, or already finished.
        for outcome in ("triggered", "merged", "terminal")
    )


def sqs_section(endpoint: str, queue_url: str, wait_seconds: int) -> dict[str, Any]:
    return {
        "notifications": {
            "sqs": {
                "queue_url": queue_url,
                "region": REGION,
                "endpoint_url": endpoint,
                "wait_seconds": wait_seconds,
            }
        }
    }


async def shards(
    procs: common.Processes, args: argparse.Namespace, endpoint: str, base_url: str
) -> dict[str, Any]:
    client = await asyncio.to_thread(sqs_client, endpoint)
    queue_url = (await asyncio.to_thread(client.create_queue, QueueName="bench-shards"))["QueueUrl"]
    ids = common.ids(args.uploads)
    own = [i for i in ids if shard_of(i, 2) == 0][:5]
    foreign = [i for i in ids if shard_of(i, 2) == 1][: args.foreign]
    port = common.free_port()
    config = common.exporter_config(
        common.LOGS / "sqs-shards.yaml",
        base_url=base_url,
        port=port,
        ingestion_ids=ids,
        interval=600,
        log_level=args.log_level,
        sections={**sqs_section(endpoint, queue_url, 20), "sharding": {"total": 2, "index": 0}},
    )
    exporter = start_exporter(procs, "sqs-shards-exporter", config, args.source)
    url = f"http://{common.HOST}:{port}/metrics"
    await common.wait_http(url, within=60, process=exporter)
    await asyncio.sleep(2)  # first polls done
    before = await triggered(url)
    await asyncio.to_thread(send, client, queue_url, foreign)
    await asyncio.to_thread(send, client, queue_url, own)
    sent = time.monotonic()
    seen = 0.0
    while time.monotonic() - sent < args.give_up:
        seen = await triggered(url) - before
        if seen >= len(own):
            break
        await asyncio.sleep(0.05)
    delay = time.monotonic() - sent
    exporter.stop()
    return {
        "foreign": len(foreign),
        "own": len(own),
        "own_seen": seen,
        "seconds": delay if seen >= len(own) else None,
        "gave_up_after": None if seen >= len(own) else args.give_up,
    }


async def reloads(
    procs: common.Processes, args: argparse.Namespace, endpoint: str, base_url: str
) -> dict[str, Any]:
    client = await asyncio.to_thread(sqs_client, endpoint)
    queue_url = (await asyncio.to_thread(client.create_queue, QueueName="bench-reloads"))[
        "QueueUrl"
    ]
    ids = common.ids(10)
    port = common.free_port()

    def write(wait_seconds: int) -> Path:
        return common.exporter_config(
            common.LOGS / "sqs-reloads.yaml",
            base_url=base_url,
            port=port,
            ingestion_ids=ids,
            interval=600,
            log_level=args.log_level,
            sections={
                **sqs_section(endpoint, queue_url, wait_seconds),
                "reload": {"watch_interval_seconds": 0},
            },
        )

    config = write(20)
    exporter = start_exporter(procs, "sqs-reloads-exporter", config, args.source)
    url = f"http://{common.HOST}:{port}/metrics"
    await common.wait_http(url, within=60, process=exporter)
    await asyncio.sleep(args.settle)
    base = (threads_of(exporter.pid), common.rss_kib(exporter.pid))
    for n in range(args.reloads):
        write(19 if n % 2 == 0 else 20)
        exporter.popen.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    right_after = (threads_of(exporter.pid), common.rss_kib(exporter.pid))
    before = await triggered(url)
    await asyncio.to_thread(send, client, queue_url, [ids[0]])
    sent = time.monotonic()
    while time.monotonic() - sent < 60:
        if await triggered(url) > before:
            break
        await asyncio.sleep(0.05)
    message_seconds = time.monotonic() - sent
    await asyncio.sleep(30)
    later = (threads_of(exporter.pid), common.rss_kib(exporter.pid))
    exporter.stop()
    return {
        "reloads": args.reloads,
        "threads": {"before": base[0], "right_after": right_after[0], "after_30s": later[0]},
        "rss_mib": {
            "before": base[1] / 1024,
            "right_after": right_after[1] / 1024,
            "after_30s": later[1] / 1024,
        },
        "message_after_reloads_seconds": message_seconds,
    }


async def run(args: argparse.Namespace) -> None:
    moto = shutil.which("moto_server") or str(Path(common.PYTHON).parent / "moto_server")
    summary: dict[str, Any] = {"quick": args.quick, "source": str(args.source)}
    with common.Processes() as procs:
        moto_port = common.free_port()
        endpoint = f"http://{common.HOST}:{moto_port}"
        moto_proc = procs.start("sqs-hostile-moto", [moto, "-H", common.HOST, "-p", str(moto_port)])
        await common.wait_http(f"{endpoint}/moto-api/", within=60, process=moto_proc)
        base_url = await procs.running_sim_server("sqs-hostile-simulator", uploads=args.uploads)
        summary["shards"] = await shards(procs, args, endpoint, base_url)
        summary["reloads"] = await reloads(procs, args, endpoint, base_url)
    s, r = summary["shards"], summary["reloads"]
    common.print_table(
        f"{s['foreign']} foreign-shard messages ahead of {s['own']} own",
        ["own seen", "seconds to all", "gave up after"],
        [[s["own_seen"], s["seconds"], s["gave_up_after"]]],
    )
    common.print_table(
        f"{r['reloads']} reloads of notifications.sqs",
        ["", "before", "right after", "30 s after"],
        [
            ["threads", *r["threads"].values()],
            ["RSS MiB", *(round(v, 1) for v in r["rss_mib"].values())],
        ],
    )
    common.note(
        f"a message sent after the reloads polled in {r['message_after_reloads_seconds']:.2f} s"
    )
    common.emit_summary("sqs_hostile", common.rounded(summary, 3))


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--foreign", type=int, default=1000, help="foreign-shard messages ahead")
    p.add_argument("--uploads", type=int, default=4000)
    p.add_argument("--reloads", type=int, default=40)
    p.add_argument("--settle", type=float, default=5.0, help="seconds before the baseline")
    p.add_argument("--give-up", type=float, default=120.0, help="seconds to wait for own ones")
    args = p.parse_args()
    import sys

    sys.path.insert(0, str(args.source))  # shard_of from the package under test
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
