"""The SQS receiver against moto's SQS server on loopback, under the conditions issue 20 found
harmful: a backlog for a replica that is down ahead of this replica's own messages (finding
12), and reloads of notifications.sqs in quick succession (finding 15)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from typing import Any

import botocore.session
import pytest
from prometheus_client import CollectorRegistry

from exporter.config import SqsConfig
from exporter.metrics import NotificationMetrics
from exporter.notifications import NotificationHandler, Parsed
from exporter.scheduler import Trigger
from exporter.sharding import Shard
from exporter.sqs import QueueErrorKind, QueueReceiver, _Worker
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


class Stuck(NotificationHandler):
    """The real handler's interface, handling nothing and never finishing: the receiver is
    stopped while it handles a batch (`entered` says it has begun)."""

    def __init__(self, metrics: NotificationMetrics) -> None:
        super().__init__(
            trigger=lambda i, polled: Trigger.TRIGGERED,
            tracker=None,  # type: ignore[arg-type]  # never asked
            metrics=metrics,
            register_unknown=False,
        )
        self.entered = asyncio.Event()

    async def handle(self, parsed: Parsed, received_at: float, receive_count: int = 1) -> bool:
        self.entered.set()
        await asyncio.Event().wait()
        return False


async def test_a_batch_the_receiver_is_stopped_in_the_middle_of_is_handed_back_at_once(
    moto_endpoint: str,
) -> None:
    """A receiver cancelled (a reload, a stop) while it handles a batch: the messages neither
    deleted nor put back yet are made visible again at once, not hidden for the queue's
    30 s visibility timeout (as they were)."""
    queue = Queue(moto_endpoint, "stopped-mid-batch")
    queue.send(body("mid-batch"))
    counts = metrics()
    handler = Stuck(counts)
    settings = SqsConfig(
        queue_url=queue.url, region=REGION, endpoint_url=moto_endpoint, wait_seconds=1
    )
    before = set(receiver_threads())
    receiver = QueueReceiver(settings, handler=handler, metrics=counts, session_factory=credentials)
    task = asyncio.create_task(receiver.run())
    await asyncio.wait_for(handler.entered.wait(), 20)
    (thread,) = set(receiver_threads()) - before
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.to_thread(thread.join, 30)  # it handed the batch back, then ended
    assert not thread.is_alive()
    answer = await asyncio.to_thread(
        queue.client.receive_message,
        QueueUrl=queue.url,
        WaitTimeSeconds=5,
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    )
    messages = answer.get("Messages", [])
    assert [json.loads(m["Body"])["ingestionId"] for m in messages] == ["mid-batch"]
    assert messages[0]["Attributes"]["ApproximateReceiveCount"] == "2"


async def test_a_result_that_meets_a_cancel_in_one_loop_step_is_handed_back() -> None:
    """The worker thread's result (a received batch) reaches the loop, and the waiting task is
    cancelled before it resumes: the thread counted the result as taken, so the waiter hands
    it back (it was dropped, its messages hidden for the visibility timeout). The 0.1 s pause
    only orders the two (the thread queues its result meanwhile); nothing is asserted on
    time."""
    worker = _Worker("sqs-test-worker")
    loop = asyncio.get_running_loop()
    handed_back: list[str] = []
    back = threading.Event()

    def cancel_after_the_result() -> None:
        time.sleep(0.1)  # blocks the loop while the thread queues the result behind us
        loop.call_soon(waiting.cancel)  # runs after the result is set, before the wake-up

    def receive() -> str:
        loop.call_soon_threadsafe(cancel_after_the_result)
        return "batch"

    def abandoned(result: str) -> None:
        handed_back.append(result)
        back.set()

    waiting = asyncio.create_task(worker.run(receive, abandoned))
    with pytest.raises(asyncio.CancelledError):
        await waiting
    worker.close()
    assert await asyncio.to_thread(back.wait, 10), "the batch was dropped"
    assert handed_back == ["batch"]


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
