"""The SQS receiver against moto's SQS server on loopback, under the conditions issue 20 found
harmful: a backlog for a replica that is down ahead of this replica's own messages (finding
12), and reloads of notifications.sqs in quick succession (finding 15)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any

import botocore.session
import pytest
from prometheus_client import CollectorRegistry

from exporter.config import SqsConfig
from exporter.metrics import NotificationMetrics
from exporter.notifications import NotificationHandler, Parsed
from exporter.scheduler import Trigger
from exporter.sharding import Shard
from exporter.sqs import QueueErrorKind, QueueReceiver
from exporter.tracking import IngestionTracker
from exporter.uploads import UploadStore
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for
from tests.test_sqs_end_to_end import ACCESS_KEY, REGION, SECRET_KEY, Queue, moto_endpoint

__all__ = ["moto_endpoint"]  # the fixture, shared with test_sqs_end_to_end

pytestmark = pytest.mark.slow

#: A foreign message received this often before the own ones were all seen: starved.
STARVED_AFTER_RECEIVES = 6


def credentials() -> botocore.session.Session:
    session = botocore.session.Session()
    session.set_credentials(ACCESS_KEY, SECRET_KEY)
    return session


def metrics() -> NotificationMetrics:
    return NotificationMetrics(CollectorRegistry(), [k.value for k in QueueErrorKind])


def body(ingestion_id: str) -> str:
    return json.dumps({"ingestionId": ingestion_id, "processingStatus": "FATAL"})


def send_all(queue: Queue, ids: list[str]) -> None:
    for start in range(0, len(ids), 10):
        entries = [
            {"Id": str(n), "MessageBody": body(i)} for n, i in enumerate(ids[start : start + 10])
        ]
        queue.client.send_message_batch(QueueUrl=queue.url, Entries=entries)


class Watching(NotificationHandler):
    """The real handler, noting the highest receive count of a message naming a foreign id
    and which own ids were triggered."""

    def __init__(self, own: set[str], **kwargs: Any) -> None:
        super().__init__(trigger=self._trigger_own, **kwargs)
        self.own = own
        self.triggered: set[str] = set()
        self.foreign_receives = 0

    def _trigger_own(self, ingestion_id: str, polled: object) -> Trigger:
        if ingestion_id in self.own:
            self.triggered.add(ingestion_id)
            return Trigger.TRIGGERED
        return Trigger.NOT_TRACKED

    async def handle(self, parsed: Parsed, received_at: float, receive_count: int = 1) -> bool:
        back = await super().handle(parsed, received_at, receive_count)
        if back:
            self.foreign_receives = max(self.foreign_receives, receive_count)
        return back


async def test_a_backlog_for_a_replica_that_is_down_never_starves_this_replicas_messages(
    moto_endpoint: str,
) -> None:
    """300 messages for shard 1 (down) sent ahead of 5 for shard 0: shard 0 puts each back,
    hidden longer every time, and reaches its own 5 before any foreign message has been
    received STARVED_AFTER_RECEIVES times (with 0-2 s, they cycled ahead of them for good)."""
    shard = Shard(index=0, total=2)
    candidates = [f"upload-{n}" for n in range(1000)]
    own = [i for i in candidates if shard.owns(i)][:5]
    foreign = [i for i in candidates if not shard.owns(i)][:300]
    queue = Queue(moto_endpoint, "foreign-backlog")
    send_all(queue, foreign)
    send_all(queue, own)
    tracker = IngestionTracker(
        UploadStore(),
        max_tracked=100,
        label_names=(),
        on_added=lambda ids: None,
        on_removed=lambda ids: None,
        on_rejected=lambda reason: None,
        shard=shard,
    )
    counts = metrics()
    handler = Watching(set(own), tracker=tracker, metrics=counts, register_unknown=False)
    settings = SqsConfig(
        queue_url=queue.url, region=REGION, endpoint_url=moto_endpoint, wait_seconds=1
    )
    receiver = QueueReceiver(
        settings,
        handler=handler,
        metrics=counts,
        session_factory=credentials,
        rng=random.Random(3),
    )
    task = asyncio.create_task(receiver.run())
    try:

        async def decided() -> bool:
            return (
                handler.triggered == set(own) or handler.foreign_receives >= STARVED_AFTER_RECEIVES
            )

        await wait_for(decided, timeout=240, interval=0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handler.triggered == set(own), (
        f"{len(handler.triggered)} of 5 own messages handled once a foreign one had been "
        f"received {handler.foreign_receives} times"
    )


def receiver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqs-receiver" and t.is_alive()]


async def test_a_message_received_after_the_receiver_stopped_is_handed_back_at_once(
    moto_endpoint: str,
) -> None:
    """A receiver cancelled (a reload) during its long poll: the message that poll brings
    back is made visible again at once for the next receiver, not hidden for the queue's
    30 s visibility timeout."""
    queue = Queue(moto_endpoint, "handed-back")
    counts = metrics()
    handler = NotificationHandler(
        trigger=lambda i, polled: Trigger.TRIGGERED,
        tracker=None,  # type: ignore[arg-type]  # every id is tracked: never asked
        metrics=counts,
        register_unknown=False,
    )
    settings = SqsConfig(
        queue_url=queue.url, region=REGION, endpoint_url=moto_endpoint, wait_seconds=10
    )
    before = set(receiver_threads())
    receiver = QueueReceiver(settings, handler=handler, metrics=counts, session_factory=credentials)
    task = asyncio.create_task(receiver.run())

    async def polling() -> bool:
        return bool(set(receiver_threads()) - before)

    await wait_for(polling)
    (thread,) = set(receiver_threads()) - before
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    queue.send(body("after-the-reload"))
    await asyncio.to_thread(thread.join, 30)  # its long poll took the message, then it ended
    assert not thread.is_alive()
    answer = await asyncio.to_thread(
        queue.client.receive_message,
        QueueUrl=queue.url,
        WaitTimeSeconds=5,
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    )
    messages = answer.get("Messages", [])
    assert [json.loads(m["Body"])["ingestionId"] for m in messages] == ["after-the-reload"]
    assert messages[0]["Attributes"]["ApproximateReceiveCount"] == "2"  # the old one's, then ours


async def test_forty_quick_reloads_leave_one_receiver_one_session_and_no_extra_threads(
    moto_endpoint: str, start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """40 reloads that each change notifications.sqs, applied back to back: one receiver
    runs afterwards (the last config's), every receiver's client comes from one botocore
    session, and the receiver threads come back to one once the old long polls end."""
    queue = Queue(moto_endpoint, "reloaded")
    _, url = await start_simulator()
    made: list[botocore.session.Session] = []

    def factory() -> botocore.session.Session:
        made.append(credentials())
        return made[-1]

    def config(wait_seconds: int) -> Any:
        sqs = {
            "queue_url": queue.url,
            "region": REGION,
            "endpoint_url": moto_endpoint,
            "wait_seconds": wait_seconds,
        }
        return fast_config(url, ["tracked"], notifications={"sqs": sqs})

    before = set(receiver_threads())
    running = await start_exporter(config(1), aws_session_factory=factory)
    exporter = running.exporter
    for n in range(40):
        exporter.apply(config(1 + n % 2))
        await asyncio.sleep(0)  # each restart gets going before the next reload

    async def one_receiver_left() -> bool:
        return len(set(receiver_threads()) - before) == 1

    await wait_for(one_receiver_left, timeout=30, interval=0.2)
    receivers = [t for t in asyncio.all_tasks() if t.get_name() == "notifications"]
    assert len(receivers) == 1
    assert exporter._receiver is not None
    assert exporter._receiver._settings.wait_seconds == 2  # the last reload's config
    assert len(made) == 1
    queue.send(body("tracked"))

    async def triggered() -> bool:
        samples = exporter.notification_metrics
        return any(samples.outcomes.labels(o)._value.get() > 0 for o in ("triggered", "merged"))

    await wait_for(triggered, timeout=15)
