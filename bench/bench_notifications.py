"""Notifications: how many SQS messages a second the exporter handles, and how soon a message
shows as a completed poll on /metrics.

moto's SQS server (`moto_server`, the test extras) and bench/sim_server.py run as processes of
their own, the exporter too, with `polling.interval_seconds: 600`, so every poll after the first
one is a triggered one. Two runs:

- throughput: a backlog of M messages (raw, each naming one tracked id at random, sent in
  batches of 10 before the exporter starts receiving) is drained; handled/s is M over the time
  from the first message counted to the last one, and triggered polls/s how many polls the
  exporter completed for them (repeat triggers of one id merge). For reference, a bare botocore
  client receiving and deleting the same way shows what the SQS server allows at all;
- latency: one message at a time, a new one once the previous one's poll shows: from
  `SendMessage` returning to `catalog_exporter_notification_poll_delay_seconds_count` going up
  on /metrics (scraped every 5 ms). This includes SQS delivery to the waiting long poll.

    .venv/bin/python bench/bench_notifications.py [--quick] [--messages 3000] [--samples 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

import common

REGION = "us-east-1"
QUEUE = "bench-notifications"


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


def send_backlog(client: Any, queue_url: str, ids: list[str], count: int, seed: int) -> None:
    """`count` raw messages naming random tracked ids, in batches of ten."""
    rng = random.Random(seed)
    for start in range(0, count, 10):
        entries = [
            {
                "Id": str(i),
                "MessageBody": json.dumps(
                    {"ingestionId": rng.choice(ids), "processingStatus": "DONE"}
                ),
            }
            for i in range(min(10, count - start))
        ]
        client.send_message_batch(QueueUrl=queue_url, Entries=entries)


def drain_plain(client: Any, queue_url: str, count: int) -> float:
    """Receive and delete `count` messages with a bare botocore client, as the exporter does
    (batches of 10); seconds taken. The reference: what this SQS server allows at all."""
    started = time.monotonic()
    drained = 0
    while drained < count:
        answer = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=20
        )
        messages = answer.get("Messages", [])
        drained += len(messages)
        if messages:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ]
            client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
    return time.monotonic() - started


async def counters(url: str) -> dict[str, float]:
    found = await common.metrics(url)
    handled = common.total(found, "catalog_exporter_notifications_total")
    polls = common.total(found, "catalog_exporter_notification_poll_delay_seconds_count")
    requests = common.total(found, "catalog_api_requests_total")
    return {"handled": handled, "polls": polls, "requests": requests}


async def run(args: argparse.Namespace) -> None:
    """Start moto, the simulator and the exporter; the two runs; tables and summary."""
    moto = shutil.which("moto_server") or str(Path(common.PYTHON).parent / "moto_server")
    messages = args.messages or (1000 if args.quick else 3000)
    samples = args.samples or (40 if args.quick else 100)
    summary: dict[str, Any] = {"quick": args.quick, "source": str(args.source)}
    with common.Processes() as procs:
        moto_port, sim_port, control_port, port = (common.free_port() for _ in range(4))
        endpoint = f"http://{common.HOST}:{moto_port}"
        moto_proc = procs.start(
            "notifications-moto", [moto, "-H", common.HOST, "-p", str(moto_port)]
        )
        sim = procs.sim_server(
            "notifications-simulator",
            port=sim_port,
            control_port=control_port,
            uploads=args.uploads,
        )
        await common.wait_http(f"http://{common.HOST}:{control_port}/stats", within=60, process=sim)
        await common.wait_http(f"{endpoint}/moto-api/", within=60, process=moto_proc)
        client = await asyncio.to_thread(sqs_client, endpoint)
        queue_url = (await asyncio.to_thread(client.create_queue, QueueName=QUEUE))["QueueUrl"]
        ids = common.ids(args.uploads)
        reference = min(messages, 500)
        plain_url = (await asyncio.to_thread(client.create_queue, QueueName="bench-plain"))[
            "QueueUrl"
        ]
        await asyncio.to_thread(send_backlog, client, plain_url, ids, reference, 3)
        plain_seconds = await asyncio.to_thread(drain_plain, client, plain_url, reference)
        common.note(f"sending a backlog of {messages} messages")
        await asyncio.to_thread(send_backlog, client, queue_url, ids, messages, 1)
        config = common.exporter_config(
            common.LOGS / "notifications.yaml",
            base_url=f"http://{common.HOST}:{sim_port}",
            port=port,
            ingestion_ids=ids,
            max_rps=args.rate,
            concurrency=16,
            interval=600.0,
            log_level=args.log_level,
            sections={
                "notifications": {
                    "sqs": {"queue_url": queue_url, "endpoint_url": endpoint, "region": REGION}
                }
            },
        )
        exporter = procs.start(
            "notifications-exporter",
            [common.PYTHON, "-m", "exporter", "--config", str(config)],
            cwd=args.source,
            # The AWS default chain finds these; moto accepts any.
            env={
                "PYTHONPATH": str(args.source),
                "AWS_ACCESS_KEY_ID": "AKIABENCH",
                "AWS_SECRET_ACCESS_KEY": "bench-secret",
            },
        )
        url = f"http://{common.HOST}:{port}/metrics"
        await common.wait_http(f"http://{common.HOST}:{port}/readyz", within=60, process=exporter)

        # Throughput: drain the backlog.
        first = last = None
        before = await counters(url)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            now = await counters(url)
            stamp = time.monotonic()
            if first is None and stamp > deadline - 570:
                break  # nothing handled within 30 s: see the exporter's log
            if first is None and now["handled"] > 0:
                first = (stamp, now)
            if now["handled"] >= messages:
                last = (stamp, now)
                break
            await asyncio.sleep(0.05)
        if first is None or last is None:
            msg = f"the backlog was not drained: {await counters(url)}\n{exporter.tail()}"
            raise RuntimeError(msg)
        seconds = last[0] - first[0]
        handled_per_s = (last[1]["handled"] - first[1]["handled"]) / seconds
        polls = last[1]["polls"] - before["polls"]
        common.print_table(
            f"throughput: a backlog of {messages} messages naming {args.uploads} tracked ids, "
            f"api limit {args.rate:g} requests/s",
            ["who", "messages", "seconds", "handled/s", "triggered polls", "polls/s"],
            [
                ("exporter", messages, seconds, handled_per_s, int(polls), polls / seconds),
                ("bare botocore", reference, plain_seconds, reference / plain_seconds, "-", "-"),
            ],
        )
        summary["throughput"] = {
            "messages": messages,
            "seconds": seconds,
            "handled_per_s": handled_per_s,
            "triggered_polls": polls,
            "bare_botocore_per_s": reference / plain_seconds,
        }

        # Latency: one message at a time.
        await asyncio.sleep(1.0)  # let the last triggered polls of the backlog finish
        rng = random.Random(2)
        latencies: list[float] = []
        for _ in range(samples):
            previous = (await counters(url))["polls"]
            body = json.dumps({"ingestionId": rng.choice(ids)})
            await asyncio.to_thread(client.send_message, QueueUrl=queue_url, MessageBody=body)
            sent = time.monotonic()
            while (await counters(url))["polls"] <= previous:
                if time.monotonic() - sent > 30:
                    msg = f"no poll within 30 s of a message\n{exporter.tail()}"
                    raise RuntimeError(msg)
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - sent)
        figures = common.stats(latencies)
        common.print_table(
            f"latency: SendMessage returned -> triggered poll counted on /metrics, {samples} "
            "messages one at a time (ms)",
            ["samples", "p50", "p90", "p99", "max"],
            [
                (
                    samples,
                    1000 * figures["median"],
                    1000 * figures["p90"],
                    1000 * figures["p99"],
                    1000 * figures["max"],
                )
            ],
        )
        summary["latency_seconds"] = figures
        exporter.stop()
    common.emit_summary("notifications", common.rounded(summary, 4))


def main() -> None:
    """Parse the arguments and run."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=0, help="backlog size (3000; quick 1000)")
    p.add_argument("--samples", type=int, default=0, help="latency samples (100; quick 40)")
    p.add_argument("--uploads", type=int, default=1000)
    p.add_argument("--rate", type=float, default=200.0, help="api.max_requests_per_second")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
