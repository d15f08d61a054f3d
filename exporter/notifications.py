"""Upload-result notifications as poll triggers: what a message names, and what it sets off.

A message is read as an SNS envelope (`Type: Notification`, its `Message` a JSON string) or
as raw delivery (the JSON itself); every value of a key spelled like `ingestionId` (any
case, `_` or `-` between the words), at any depth, is an id it names. A tracked id is polled
now (`Poller.trigger`); an unknown one is counted, and tracked only with `register_unknown`.
The Catalog API stays the one source of status: a misread message costs one request, never
a wrong metric. Parsing is pure and bounded (size, JSON depth, ids per message), so it can
run in a worker thread; this module does no queue I/O (see `sqs`). A SubscriptionConfirmation
is logged, and its SubscribeURL visited only when allowed, only on SNS's own host, without
following a redirect.
"""

from __future__ import annotations

import enum
import json
import math
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from exporter.boundedjson import MAX_JSON_DEPTH, json_depth_exceeds
from exporter.metrics import NotificationMetrics
from exporter.responses import clean_text
from exporter.scheduler import Trigger
from exporter.tracking import Source, Tracker

__all__ = [
    "MAX_IDS_PER_MESSAGE",
    "MAX_MESSAGE_BYTES",
    "RELEASE_AFTER_RECEIVES_AT_MOST",
    "RELEASE_BACKLOG_FACTOR",
    "RELEASE_BACKLOG_MAX_SECONDS",
    "RELEASE_PAUSE_SECONDS",
    "RELEASE_VISIBILITY_MAX_SECONDS",
    "RELEASE_VISIBILITY_SECONDS",
    "Confirmation",
    "Malformed",
    "MalformedKind",
    "Named",
    "NotificationHandler",
    "Parsed",
    "confirm_subscription",
    "parse_message",
    "release_visibility",
    "subscribe_url_problem",
]

log = structlog.get_logger("exporter.notifications")

#: Largest message body read, in bytes: SQS's own ceiling (1 MiB). Larger is malformed.
MAX_MESSAGE_BYTES = 1024 * 1024

#: Ids taken from one message at most; a message naming more is cut there (and logged).
MAX_IDS_PER_MESSAGE = 100

#: With sharding and a queue the replicas share, a message naming an id another replica owns
#: goes back to the queue for the owner to receive, hidden for a while (`release_visibility`)
#: that grows two ways. With the times it was received: 1-2 s the first time, so a live owner
#: gets it soon, then doubling up to `RELEASE_VISIBILITY_MAX_SECONDS`. And with how long this
#: replica has been receiving nothing but such messages (a backlog for an owner that is down):
#: `RELEASE_BACKLOG_FACTOR` times that, up to `RELEASE_BACKLOG_MAX_SECONDS`, so that what it
#: put back stays hidden until it has gone through the backlog to its own messages behind it,
#: instead of receiving the same ones again and again. After this many receives the message
#: is deleted instead: time enough for an owner to restart (about 6 minutes at least), and an
#: owner gone for good does not keep the message alive. The first kind stays short, so that
#: an owner back from a restart gets its messages within seconds.
RELEASE_VISIBILITY_SECONDS = 2
RELEASE_VISIBILITY_MAX_SECONDS = 8
RELEASE_BACKLOG_FACTOR = 4.0
RELEASE_BACKLOG_MAX_SECONDS = 900
RELEASE_AFTER_RECEIVES_AT_MOST = 60

#: Outside a backlog, the replica that put a message back waits up to this long (at random)
#: before asking again, so that it is not always the first to ask when the message shows
#: again (moto, for one, rescans on a 1 s beat that whole-second visibilities keep in step).
RELEASE_PAUSE_SECONDS = 1.0

#: The answer to a SubscribeURL visit read at most (it is a short XML document).
_MAX_CONFIRM_BYTES = 64 * 1024
_CONFIRM_TIMEOUT_SECONDS = 10.0

_SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_ID_KEY = "ingestionid"  # a key, lower-cased without "_" and "-"
_REGION = re.compile(r"[a-z]{2}(?:-[a-z0-9]+)+")
_TOPIC_ARN = re.compile(
    r"arn:aws[a-z-]*:sns:([a-z]{2}(?:-[a-z0-9]+)+):\d{12}:[A-Za-z0-9_.-]{1,256}"
)


class MalformedKind(enum.StrEnum):
    """Why a message was unusable (the reason label of the malformed count's log line)."""

    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    NOT_JSON = "not_json"
    NO_ID = "no_id"


@dataclass(frozen=True, slots=True)
class Named:
    """A message naming ids (first `MAX_IDS_PER_MESSAGE`, duplicates dropped, in order)."""

    ids: tuple[str, ...]
    enveloped: bool
    cut: bool = False


@dataclass(frozen=True, slots=True)
class Confirmation:
    """An SNS SubscriptionConfirmation (or UnsubscribeConfirmation): not a result."""

    type: str
    topic_arn: str
    subscribe_url: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message that names no id; `detail` is safe to log."""

    kind: MalformedKind
    detail: str


Parsed = Named | Confirmation | Malformed


def parse_message(body: object) -> Parsed:
    """Read one message body. Pure, never raises, bounded in size and depth."""
    if not isinstance(body, str):
        return Malformed(MalformedKind.NOT_JSON, "the body is not text")
    if len(body) > MAX_MESSAGE_BYTES or len(body.encode("utf-8", "replace")) > MAX_MESSAGE_BYTES:
        return Malformed(MalformedKind.TOO_LARGE, f"larger than {MAX_MESSAGE_BYTES} bytes")
    document = _load(body)
    enveloped = isinstance(document, dict) and document.get("Type") in _SNS_TYPES
    if isinstance(document, dict) and enveloped:
        document = _unwrap(document)
    if isinstance(document, Malformed | Confirmation):
        return document
    ids = dict.fromkeys(_ids_in(document))
    if not ids:
        return Malformed(MalformedKind.NO_ID, "JSON naming no ingestionId")
    kept = tuple(ids)[:MAX_IDS_PER_MESSAGE]
    return Named(kept, enveloped=enveloped, cut=len(ids) > MAX_IDS_PER_MESSAGE)


def release_visibility(receive_count: int, rng: random.Random, foreign_for: float = 0.0) -> int:
    """Seconds a message put back for another replica stays hidden, after its
    `receive_count`th receive, this replica having received nothing but such messages for
    `foreign_for` seconds: the longer of `RELEASE_BACKLOG_FACTOR` times that (at most
    `RELEASE_BACKLOG_MAX_SECONDS`) and between half and all of a ceiling that starts at
    `RELEASE_VISIBILITY_SECONDS` and doubles with each receive, up to
    `RELEASE_VISIBILITY_MAX_SECONDS`. Never 0, so this replica is not the next to get it."""
    doublings = min(max(receive_count, 1) - 1, 16)
    ceiling = min(RELEASE_VISIBILITY_SECONDS * 2**doublings, RELEASE_VISIBILITY_MAX_SECONDS)
    backlog = min(RELEASE_BACKLOG_FACTOR * max(0.0, foreign_for), RELEASE_BACKLOG_MAX_SECONDS)
    return max(rng.randint(max(1, ceiling // 2), ceiling), math.ceil(backlog))


def _unwrap(envelope: dict[str, Any]) -> Any | Malformed | Confirmation:
    """An SNS envelope's message, parsed; or the confirmation it is."""
    if envelope["Type"] != "Notification":
        return Confirmation(
            type=str(envelope["Type"]),
            topic_arn=_text(envelope.get("TopicArn")),
            subscribe_url=_text(envelope.get("SubscribeURL")),
        )
    inner = envelope.get("Message")
    if not isinstance(inner, str):
        return Malformed(MalformedKind.NOT_JSON, "SNS envelope without a Message string")
    return _load(inner)


def _load(text: str) -> Any | Malformed:
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        return Malformed(MalformedKind.TOO_DEEP, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return Malformed(MalformedKind.NOT_JSON, f"not JSON: {error.msg}")
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        return Malformed(MalformedKind.NOT_JSON, "not JSON: a value Python cannot read")


def _ids_in(document: Any) -> Iterator[str]:
    """Values of keys spelled like ingestionId, at any depth, in document order."""
    stack: list[Iterator[tuple[object, Any]]] = [iter([(None, document)])]
    while stack:
        pair = next(stack[-1], None)
        if pair is None:
            stack.pop()
            continue
        key, node = pair
        if isinstance(key, str) and key.lower().replace("_", "").replace("-", "") == _ID_KEY:
            values = node if isinstance(node, list) else [node]
            yield from (value for value in values if isinstance(value, str))
        elif isinstance(node, dict):
            stack.append(iter(node.items()))
        elif isinstance(node, list):
            stack.append((None, item) for item in node)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def subscribe_url_problem(url: str, topic_arn: str) -> str | None:
    """Why a SubscribeURL must not be visited, or None: only https on
    sns.<the topic's region>.amazonaws.com (the default port), confirming that topic."""
    topic = _TOPIC_ARN.fullmatch(topic_arn)
    if topic is None:
        return "the TopicArn is not an SNS topic ARN"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "the SubscribeURL is not a valid URL"
    host = f"sns.{topic.group(1)}.amazonaws.com"
    query = urllib.parse.parse_qs(parts.query)
    checks = (
        (parts.scheme != "https", "the SubscribeURL is not https"),
        (
            "@" in parts.netloc or port not in (None, 443),
            "the SubscribeURL carries credentials or a port",
        ),
        (parts.netloc.lower() not in (host, f"{host}:443"), f"its host is not {host}"),
        (
            query.get("Action") != ["ConfirmSubscription"] or query.get("TopicArn") != [topic_arn],
            "the SubscribeURL does not confirm this topic",
        ),
    )
    return next((message for failed, message in checks if failed), None)


async def confirm_subscription(session: aiohttp.ClientSession, url: str) -> bool:
    """GET a SubscribeURL already checked by `subscribe_url_problem`; never follows a
    redirect. True on 200."""
    try:
        async with session.get(
            url,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=_CONFIRM_TIMEOUT_SECONDS),
        ) as response:
            await response.content.read(_MAX_CONFIRM_BYTES)
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class NotificationHandler:
    """Turns parsed messages into triggered polls, registrations and counts.

    `trigger` is the poller's; `confirm` visits a checked SubscribeURL (None: never).
    """

    def __init__(
        self,
        *,
        trigger: Callable[[str, Callable[[], None] | None], Trigger],
        tracker: Tracker,
        metrics: NotificationMetrics,
        register_unknown: bool,
        confirm: Callable[[str], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trigger = trigger
        self._tracker = tracker
        self._metrics = metrics
        self._register_unknown = register_unknown
        self._confirm = confirm
        self._clock = clock
        self._malformed_logged: set[MalformedKind] = set()

    async def handle(self, parsed: Parsed, received_at: float, receive_count: int = 1) -> bool:
        """Act on one message, received (by `clock`) at `received_at` for the
        `receive_count`th time. True: put the message back in the queue rather than delete
        it, as it names an id another replica owns (sharding)."""
        if isinstance(parsed, Malformed):
            self._malformed(parsed)
        elif isinstance(parsed, Confirmation):
            await self._confirmation(parsed)
        else:
            if parsed.cut:
                log.warning("notification_names_too_many_ids", kept=MAX_IDS_PER_MESSAGE)
            owned = [await self._named(i, received_at) for i in parsed.ids]
            return not all(owned) and receive_count < RELEASE_AFTER_RECEIVES_AT_MOST
        return False

    async def _named(self, ingestion_id: str, received_at: float) -> bool:
        """Act on one id named by a message; False if another replica owns it."""

        def polled() -> None:
            self._metrics.poll_delay.observe(max(0.0, self._clock() - received_at))

        result = self._trigger(ingestion_id, polled)
        if result is not Trigger.NOT_TRACKED:
            self._metrics.count(result.value)
            return True
        if not self._tracker.owns(ingestion_id):
            # Sharded, with a queue the replicas share: the id is another replica's to poll.
            self._metrics.count("not_owned")
            log.debug("notification_for_another_shard", ingestion_id=clean_text(ingestion_id))
            return False
        self._metrics.count("unknown_id")
        log.debug("notification_for_unknown_id", ingestion_id=clean_text(ingestion_id))
        if not self._register_unknown:
            return True
        # The tracker validates the id, applies the cap and counts a rejection by reason.
        registration = await self._tracker.register(ingestion_id, Source.NOTIFICATION)
        if registration.accepted and registration.created:
            self._metrics.count("registered")
            # Its first poll is due within a second: moved ahead, and timed from now on.
            self._trigger(ingestion_id, polled)
        return True

    def _malformed(self, message: Malformed) -> None:
        self._metrics.count("malformed")
        if message.kind not in self._malformed_logged:
            self._malformed_logged.add(message.kind)
            log.warning(
                "notification_malformed",
                reason=message.kind.value,
                detail=message.detail,
                note='counted in catalog_exporter_notifications_total{outcome="malformed"} '
                "and deleted; logged once per reason",
            )

    async def _confirmation(self, message: Confirmation) -> None:
        self._metrics.count("confirmation")
        topic = clean_text(message.topic_arn)
        if message.type != "SubscriptionConfirmation":
            log.warning("sns_unsubscribe_confirmation", topic_arn=topic)
            return
        if self._confirm is None:
            log.warning(
                "sns_subscription_confirmation",
                topic_arn=topic,
                hint="not visited: confirm the subscription in the Merchant Portal or the SNS "
                "console, or set notifications.sqs.confirm_subscriptions: true",
            )
            return
        problem = subscribe_url_problem(message.subscribe_url, message.topic_arn)
        if problem is not None:
            log.warning("sns_subscription_not_confirmed", topic_arn=topic, reason=problem)
            return
        confirmed = await self._confirm(message.subscribe_url)
        log.info("sns_subscription_confirmation_visited", topic_arn=topic, confirmed=confirmed)
