"""Reading notification messages, refusing SubscribeURLs, and the notifications.sqs config."""

from __future__ import annotations

import asyncio
import json
import random

import botocore.session
import pytest
from prometheus_client import CollectorRegistry

from exporter.boundedjson import MAX_JSON_DEPTH
from exporter.config import ConfigError, SqsConfig, parse_config
from exporter.metrics import NotificationMetrics
from exporter.notifications import (
    MAX_IDS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    RELEASE_AFTER_RECEIVES_AT_MOST,
    Confirmation,
    Malformed,
    MalformedKind,
    Named,
    NotificationHandler,
    parse_message,
    subscribe_url_problem,
)
from exporter.scheduler import Trigger
from exporter.sharding import Shard
from exporter.sqs import QueueErrorKind, QueueReceiver
from exporter.tracking import IngestionTracker
from exporter.uploads import UploadStore
from tests.conftest import free_port

TOPIC = "arn:aws:sns:eu-west-1:123456789012:catalog-upload-results"
GOOD_URL = (
    "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC}&Token=2336412f37fb687f5d51e6e2425f004aed"
)


def envelope(message: object, kind: str = "Notification", **extra: str) -> str:
    return json.dumps({"Type": kind, "TopicArn": TOPIC, "Message": message, **extra})


def test_a_raw_message_names_every_id_key_at_any_depth_in_any_spelling() -> None:
    """ingestionId, INGESTION_ID, ingestion-id, nested and in lists, duplicates once, in order."""
    body = json.dumps(
        {
            "ingestionId": "a",
            "detail": {"INGESTION_ID": "b", "items": [{"ingestion-id": "c"}, {"IngestionId": "a"}]},
            "ingestionIds": "not-this-key",
            "other": {"ingestionid": ["d", 42, None]},
        }
    )
    assert parse_message(body) == Named(("a", "b", "c", "d"), enveloped=False)


def test_an_sns_envelope_is_unwrapped() -> None:
    """Type Notification: the Message string is the JSON read for ids."""
    body = envelope(json.dumps({"uploadResult": {"ingestionId": "x-1", "status": "DONE"}}))
    assert parse_message(body) == Named(("x-1",), enveloped=True)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("not json at all", MalformedKind.NOT_JSON),
        ("", MalformedKind.NOT_JSON),
        (None, MalformedKind.NOT_JSON),
        (json.dumps({"status": "DONE"}), MalformedKind.NO_ID),
        (json.dumps({"ingestionId": 7}), MalformedKind.NO_ID),
        (json.dumps(["a", "b"]), MalformedKind.NO_ID),
        (envelope("plain text"), MalformedKind.NOT_JSON),
        (envelope({"ingestionId": "x"}), MalformedKind.NOT_JSON),  # Message not a string
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), MalformedKind.TOO_DEEP),
        (envelope("[" * 10_000), MalformedKind.TOO_DEEP),
        ('{"ingestionId": "' + "x" * MAX_MESSAGE_BYTES + '"}', MalformedKind.TOO_LARGE),
        ('{"n": ' + "9" * 5000 + "}", MalformedKind.NOT_JSON),
    ],
)
def test_unusable_messages_are_malformed_by_kind(body: object, kind: MalformedKind) -> None:
    """Not JSON, no id, too deep (no RecursionError) or too large: a kind, never an exception."""
    parsed = parse_message(body)
    assert isinstance(parsed, Malformed)
    assert parsed.kind is kind


def test_a_message_naming_thousands_of_ids_is_cut() -> None:
    """Only the first MAX_IDS_PER_MESSAGE ids are taken, and the cut is flagged."""
    parsed = parse_message(json.dumps([{"ingestionId": f"id-{i}"} for i in range(5000)]))
    assert isinstance(parsed, Named)
    assert parsed.cut
    assert parsed.ids == tuple(f"id-{i}" for i in range(MAX_IDS_PER_MESSAGE))


def test_subscription_confirmations_are_recognised_not_searched_for_ids() -> None:
    """SubscriptionConfirmation and UnsubscribeConfirmation are confirmations."""
    body = envelope(
        json.dumps({"ingestionId": "x"}), "SubscriptionConfirmation", SubscribeURL=GOOD_URL
    )
    assert parse_message(body) == Confirmation("SubscriptionConfirmation", TOPIC, GOOD_URL)
    parsed = parse_message(envelope("bye", "UnsubscribeConfirmation"))
    assert isinstance(parsed, Confirmation)
    assert parsed.type == "UnsubscribeConfirmation"


def test_the_one_acceptable_subscribe_url_is_https_on_the_topics_sns_host() -> None:
    """https, sns.<topic region>.amazonaws.com, default port, confirming this very topic."""
    assert subscribe_url_problem(GOOD_URL, TOPIC) is None
    assert subscribe_url_problem(GOOD_URL.replace(".com/", ".com:443/"), TOPIC) is None


@pytest.mark.parametrize(
    ("url", "topic"),
    [
        (GOOD_URL.replace("https://", "http://"), TOPIC),
        (GOOD_URL.replace("sns.eu-west-1", "sns.us-east-1"), TOPIC),
        (GOOD_URL.replace("sns.eu-west-1.amazonaws.com", "evil.example"), TOPIC),
        (
            GOOD_URL.replace("sns.eu-west-1.amazonaws.com", "sns.eu-west-1.amazonaws.com.evil"),
            TOPIC,
        ),
        (GOOD_URL.replace("https://", "https://user:pw@"), TOPIC),
        (GOOD_URL.replace(".com/", ".com:8443/"), TOPIC),
        (GOOD_URL.replace(".com/", ".com@evil.example/"), TOPIC),
        (GOOD_URL.replace("https://", "https://evil.example#"), TOPIC),
        (GOOD_URL.replace("ConfirmSubscription", "Unsubscribe"), TOPIC),
        (GOOD_URL.replace(TOPIC, TOPIC + "-other"), TOPIC),
        (GOOD_URL, "arn:aws:sns:eu-west-1:123:short-account"),
        (GOOD_URL, "not an arn"),
        ("https://[::1", TOPIC),
        ("", TOPIC),
    ],
)
def test_every_other_subscribe_url_is_refused(url: str, topic: str) -> None:
    """Another scheme, host, port, credentials, action or topic: a reason, never a visit."""
    assert subscribe_url_problem(url, topic) is not None


class Confirmer:
    """Counts visits: the refusal paths must never reach it."""

    def __init__(self) -> None:
        self.visited: list[str] = []

    async def __call__(self, url: str) -> bool:
        self.visited.append(url)
        return True


class NoTracker:
    async def register(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing is registered without register_unknown")

    def owns(self, ingestion_id: str) -> bool:
        return True


def handler(confirm: Confirmer | None) -> tuple[NotificationHandler, NotificationMetrics]:
    metrics = NotificationMetrics(CollectorRegistry(), [k.value for k in QueueErrorKind])
    return (
        NotificationHandler(
            trigger=lambda _id, _done: Trigger.NOT_TRACKED,
            tracker=NoTracker(),  # type: ignore[arg-type]
            metrics=metrics,
            register_unknown=False,
            confirm=confirm,
        ),
        metrics,
    )


def counted(metrics: NotificationMetrics, outcome: str) -> float:
    return metrics.outcomes.labels(outcome)._value.get()


async def test_a_confirmation_is_never_visited_by_default() -> None:
    """Without confirm_subscriptions there is nothing to visit with: counted only."""
    notifications, metrics = handler(None)
    body = envelope("", "SubscriptionConfirmation", SubscribeURL=GOOD_URL)
    await notifications.handle(parse_message(body), 0.0)
    assert counted(metrics, "confirmation") == 1


@pytest.mark.parametrize(
    "url",
    [
        GOOD_URL.replace("sns.eu-west-1.amazonaws.com", "127.0.0.1:9"),
        GOOD_URL.replace("https://", "http://"),
        "",
    ],
)
async def test_a_confirmation_with_a_foreign_subscribe_url_is_not_visited(url: str) -> None:
    """With confirm_subscriptions, a URL off SNS's host is refused before any request."""
    confirm = Confirmer()
    notifications, metrics = handler(confirm)
    body = envelope("", "SubscriptionConfirmation", SubscribeURL=url)
    await notifications.handle(parse_message(body), 0.0)
    assert confirm.visited == []
    assert counted(metrics, "confirmation") == 1


async def test_a_valid_subscribe_url_is_handed_to_the_confirmer() -> None:
    """The one accepted URL reaches the confirmer (which the exporter backs with a no-redirect
    GET); the test's confirmer contacts nothing."""
    confirm = Confirmer()
    notifications, _ = handler(confirm)
    body = envelope("", "SubscriptionConfirmation", SubscribeURL=GOOD_URL)
    await notifications.handle(parse_message(body), 0.0)
    assert confirm.visited == [GOOD_URL]


# The notifications.sqs config section

API = {"base_url": "https://api.example.com", "auth": {"type": "none"}}


async def test_an_id_another_shard_owns_is_counted_as_not_owned_and_its_message_put_back() -> None:
    """With sharding and a shared queue, an id this replica does not own is the owner's to
    poll: counted apart from unknown ids, not registered even with register_unknown, and its
    message goes back to the queue for the owner, until it has been received too often."""
    shard = Shard(index=0, total=2)
    ids = [f"ingestion-{n}" for n in range(40)]
    mine = next(i for i in ids if shard.owns(i))
    theirs = next(i for i in ids if not shard.owns(i))
    store = UploadStore()
    tracker = IngestionTracker(
        store,
        max_tracked=100,
        label_names=(),
        on_added=lambda added: None,
        on_removed=lambda removed: None,
        on_rejected=lambda reason: None,
        shard=shard,
    )
    metrics = NotificationMetrics(CollectorRegistry(), [k.value for k in QueueErrorKind])
    handler = NotificationHandler(
        trigger=lambda i, _done: Trigger.NOT_TRACKED,
        tracker=tracker,
        metrics=metrics,
        register_unknown=True,
    )
    assert await handler.handle(Named((mine, theirs), enveloped=False), received_at=0.0)
    assert {u.ingestion_id for u in store} == {mine}
    assert [counted(metrics, o) for o in ("unknown_id", "registered", "not_owned")] == [1, 1, 1]
    assert not await handler.handle(Named((mine,), enveloped=False), received_at=0.0)
    last = RELEASE_AFTER_RECEIVES_AT_MOST
    assert await handler.handle(Named((theirs,), enveloped=False), 0.0, receive_count=last - 1)
    assert not await handler.handle(Named((theirs,), enveloped=False), 0.0, receive_count=last)


def sqs(environ: dict[str, str] | None = None, **values: object) -> SqsConfig:
    document = {"api": API, "notifications": {"sqs": values}}
    return parse_config(document, environ=environ or {}).notifications.sqs


def test_notifications_are_off_by_default() -> None:
    """No section, or an empty queue_url: off, needing no region."""
    assert parse_config({"api": API}, environ={}).notifications.sqs == SqsConfig()
    assert sqs(register_unknown=True).queue_url == ""


def test_the_region_comes_from_the_file_the_queue_url_or_the_environment() -> None:
    """File first, then sqs.<region>.amazonaws.com (or the legacy host), then AWS_REGION."""
    url = "https://sqs.ap-southeast-2.amazonaws.com/123456789012/results"
    assert sqs(queue_url=url).region == "ap-southeast-2"
    assert sqs(queue_url=url, region="eu-west-1").region == "eu-west-1"
    legacy = "https://us-west-2.queue.amazonaws.com/123456789012/results"
    assert sqs(queue_url=legacy).region == "us-west-2"
    local = "http://127.0.0.1:4566/000000000000/results"
    assert sqs({"AWS_DEFAULT_REGION": "eu-central-1"}, queue_url=local).region == "eu-central-1"


def test_bad_notification_settings_are_each_reported() -> None:
    """Every bad key of the section in one error, by path."""
    with pytest.raises(ConfigError) as caught:
        sqs(
            queue_url="http://127.0.0.1:4566/000000000000/results",
            endpoint_url="ftp://localhost",
            wait_seconds=21,
            max_messages=0,
            register_unknown="yes",
            max_backoff_seconds=0,
            visibility=3,
        )
    paths = {problem.split(":", 1)[0] for problem in caught.value.problems}
    assert paths == {
        f"notifications.sqs.{key}"
        for key in (
            "visibility",
            "endpoint_url",
            "register_unknown",
            "wait_seconds",
            "max_messages",
            "max_backoff_seconds",
            "region",
        )
    }


def test_a_queue_url_with_credentials_is_refused_without_echoing_it() -> None:
    """user:secret@ in the queue URL is an error whose message does not repeat the URL."""
    with pytest.raises(ConfigError) as caught:
        sqs(queue_url="https://AKIA:hunter2@sqs.us-east-1.amazonaws.com/1/q")
    assert "credentials" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_queue_errors_back_off_exponentially_with_jitter_and_are_counted_by_kind() -> None:
    """Nothing listening at the endpoint: each failure is a `network` error, and the waits
    double from 1 s up to max_backoff_seconds, each between half and all of its ceiling."""
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 6:
            raise asyncio.CancelledError

    def session() -> botocore.session.Session:
        made = botocore.session.Session()
        made.set_credentials("AKIATEST", "not-a-real-secret")
        return made

    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = SqsConfig(
        queue_url=f"{endpoint}/123456789012/q",
        region="us-east-1",
        endpoint_url=endpoint,
        max_backoff_seconds=8.0,
    )
    notifications, metrics = handler(None)
    receiver = QueueReceiver(
        settings,
        handler=notifications,
        metrics=metrics,
        session_factory=session,
        rng=random.Random(7),
        sleep=sleep,
    )
    with pytest.raises(asyncio.CancelledError):
        await receiver.run()
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(c / 2 <= s <= c for s, c in zip(sleeps, ceilings, strict=True)), sleeps
    assert metrics.errors.labels("network")._value.get() == 6
    assert receiver.held_secrets() == ("not-a-real-secret",)
