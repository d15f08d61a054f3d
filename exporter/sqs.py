"""The SQS receive loop: long-poll the notification queue, hand each message on, delete.

botocore's SQS client does the signing and the protocol (credentials from the AWS default
chain, as for SigV4); its blocking calls run one at a time on a daemon thread of our own, so
a 20-second long poll holds neither the event loop nor the default executor, and does not
hold up the process's exit. Messages are parsed there too (`notifications.parse_message`),
then handled on the loop, then deleted in one batch, malformed ones included (a message
naming an id another replica owns goes back to the queue instead, for its owner). Queue errors
are counted by kind and retried with jittered exponential backoff; polling of the Catalog
API never waits on the queue. A receiver cancelled (a reload, a stop) hands back what it holds:
the late result of its long poll, or what it had not yet deleted or put back of a batch, is
made visible again at once rather than after the visibility timeout. No secret reaches a
log: botocore's messages are cleaned, and the credentials in use are offered to the log mask
(`held_secrets`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.session
import structlog

from exporter.backoff import backoff_delay
from exporter.config import SqsConfig
from exporter.metrics import NotificationMetrics
from exporter.notifications import (
    RELEASE_PAUSE_SECONDS,
    NotificationHandler,
    Parsed,
    parse_message,
    release_visibility,
)
from exporter.responses import describe_error

__all__ = ["AwsSessions", "QueueErrorKind", "QueueReceiver", "classify_error"]

log = structlog.get_logger("exporter.sqs")

T = TypeVar("T")

#: First retry after a queue error waits about this long; each further one doubles it, up
#: to `notifications.sqs.max_backoff_seconds`.
INITIAL_BACKOFF_SECONDS = 1.0

#: With wait_seconds 0 (short polling), an empty answer waits this long before the next.
SHORT_POLL_PAUSE_SECONDS = 1.0

#: A worker thread whose call returned waits at most this long for the event loop to take
#: the result; a result not taken (its waiter was cancelled) is handed back instead.
HANDOFF_TIMEOUT_SECONDS = 10.0


class QueueErrorKind(enum.StrEnum):
    """Why a call to the queue failed (catalog_exporter_notification_errors_total's kind)."""

    ACCESS_DENIED = "access_denied"  # the role may not receive or delete (IAM, KMS)
    CREDENTIALS = "credentials"  # no, expired or unknown AWS credentials
    NO_SUCH_QUEUE = "no_such_queue"
    THROTTLED = "throttled"
    NETWORK = "network"  # no connection, timeout, connection closed
    SERVER_ERROR = "server_error"  # SQS answered 5xx
    DELETE_FAILED = "delete_failed"  # a message of a batch could not be deleted
    RELEASE_FAILED = "release_failed"  # one could not be put back for another shard
    OTHER = "other"


_CODES = {
    QueueErrorKind.ACCESS_DENIED: (
        "AccessDenied",
        "AccessDeniedException",
        "KMS.AccessDeniedException",
        "KMS.DisabledException",
    ),
    QueueErrorKind.CREDENTIALS: (
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSecurity",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    ),
    QueueErrorKind.NO_SUCH_QUEUE: (
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "NonExistentQueue",
    ),
    QueueErrorKind.THROTTLED: (
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "KMS.ThrottlingException",
        "OverLimit",
    ),
}
_KIND_OF_CODE = {code: kind for kind, codes in _CODES.items() for code in codes}


def classify_error(error: BaseException) -> QueueErrorKind:
    """The kind of a botocore error (anything unexpected is `other`)."""
    if isinstance(error, botocore.exceptions.ClientError):
        return _kind_of_answer(error.response)
    if isinstance(
        error,
        botocore.exceptions.NoCredentialsError
        | botocore.exceptions.PartialCredentialsError
        | botocore.exceptions.CredentialRetrievalError,
    ):
        return QueueErrorKind.CREDENTIALS
    if isinstance(
        error,
        botocore.exceptions.HTTPClientError
        | botocore.exceptions.EndpointConnectionError
        | ConnectionError
        | TimeoutError,
    ):
        return QueueErrorKind.NETWORK
    return QueueErrorKind.OTHER


def _kind_of_answer(response: Any) -> QueueErrorKind:
    kind = _KIND_OF_CODE.get(str(response.get("Error", {}).get("Code", "")))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if kind is None and status >= 500:
        kind = QueueErrorKind.SERVER_ERROR
    elif kind is None and status in (401, 403):
        kind = QueueErrorKind.ACCESS_DENIED
    return kind or QueueErrorKind.OTHER


class AwsSessions:
    """The botocore session the receivers share, and the clients made from it.

    A session reads the credential chain and loads the service model once; building one per
    reload of notifications.sqs cost about 7 MiB each, never given back. It is replaced only
    when the credentials it found stop working (`forget`). Made on first use, on a worker
    thread (it reads files); a lock keeps two threads from making clients from it at once.
    """

    def __init__(self, factory: Callable[[], botocore.session.Session]) -> None:
        self._factory = factory
        self._session: botocore.session.Session | None = None
        self._lock = threading.Lock()

    def client(
        self, settings: SqsConfig
    ) -> tuple[Any, botocore.session.Session, botocore.credentials.Credentials | None]:
        """A new SQS client for `settings`, the session it came from, and its credentials."""
        with self._lock:
            if self._session is None:
                self._session = self._factory()
            session = self._session
            credentials = session.get_credentials()
            client = session.create_client(
                "sqs",
                region_name=settings.region,
                endpoint_url=settings.endpoint_url or None,
                config=botocore.config.Config(
                    connect_timeout=5,
                    # Longer than the long poll, or every empty poll would be a timeout.
                    read_timeout=settings.wait_seconds + 10,
                    # We retry ourselves, with backoff, counting every failure.
                    retries={"total_max_attempts": 1},
                    max_pool_connections=1,
                    user_agent_extra="catalog-upload-exporter",
                ),
            )
        return client, session, credentials

    def forget(self, session: botocore.session.Session) -> None:
        """`session`'s credentials failed: the next client comes from a new session."""
        with self._lock:
            if self._session is session:
                self._session = None


@dataclass(frozen=True, slots=True)
class _Call:
    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    abandoned: Callable[[Any], None] | None


class _Worker:
    """One daemon thread running blocking calls in order, for one event loop.

    A daemon: a long poll in progress when the exporter stops must not delay its exit by up
    to 20 s, as a ThreadPoolExecutor's worker (joined at exit) would.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call | Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, call: Callable[[], T], abandoned: Callable[[T], None] | None = None) -> T:
        """Run `call` on the thread; cancelling the wait does not interrupt the call. If
        nobody takes its result any more (the wait was cancelled), `abandoned` gets it, on
        the thread: what was received is handed back rather than lost."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put(_Call(call, loop, future, abandoned))
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after the result arrived but before this task resumed: the thread
            # counts it as taken, so it is handed back from here.
            taken = future.done() and not future.cancelled() and future.exception() is None
            if abandoned is not None and taken:
                self.later(functools.partial(abandoned, future.result()))
            raise

    def later(self, call: Callable[[], None]) -> None:
        """Run `call` on the thread after the calls queued so far; a failure is logged."""
        if self._thread is not None:
            self._calls.put(call)

    def close(self, last: Callable[[], None] | None = None) -> None:
        """Let the thread end once the calls queued (then `last`, if given) have run."""
        if self._thread is not None:
            if last is not None:
                self.later(last)
            self._calls.put(None)
            self._thread = None

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            if not isinstance(item, _Call):
                _quietly(item)
                continue
            try:
                result, error = item.call(), None
            except Exception as exc:  # handed to the awaiting task
                result, error = None, exc
            taken = concurrent.futures.Future[bool]()
            try:
                item.loop.call_soon_threadsafe(_settle, item.future, result, error, taken)
                accepted = taken.result(timeout=HANDOFF_TIMEOUT_SECONDS)
            except (RuntimeError, TimeoutError):  # the loop is closed, or stopped
                accepted = False
            abandoned = item.abandoned
            if not accepted and error is None and abandoned is not None:
                _quietly(functools.partial(abandoned, result))


def _quietly(call: Callable[[], None]) -> None:
    """Run a clean-up call on the worker thread; a failure is logged, never raised."""
    try:
        call()
    except Exception as error:
        log.warning("notification_queue_cleanup_failed", error=describe_error(error))


def _settle(
    future: asyncio.Future[Any],
    result: Any,
    error: Exception | None,
    taken: concurrent.futures.Future[bool],
) -> None:
    if future.done():
        taken.set_result(False)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    taken.set_result(True)


@dataclass(frozen=True, slots=True)
class Received:
    """One message as received: its receipt handle, what it says, and how many times the
    queue has handed it out (SQS's ApproximateReceiveCount, this time included)."""

    handle: str
    parsed: Parsed
    receive_count: int


class QueueReceiver:
    """Long-polls one queue for as long as it runs; see the module docstring."""

    def __init__(
        self,
        settings: SqsConfig,
        *,
        handler: NotificationHandler,
        metrics: NotificationMetrics,
        session_factory: Callable[[], botocore.session.Session] = botocore.session.Session,
        sessions: AwsSessions | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._metrics = metrics
        # The exporter's, shared by the receivers of successive reloads; else our own.
        self._sessions = sessions if sessions is not None else AwsSessions(session_factory)
        self._session: botocore.session.Session | None = None
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._sleep = sleep
        self._clock = clock
        self._worker = _Worker("sqs-receiver")
        self._client: Any = None
        self._credentials: botocore.credentials.Credentials | None = None
        self._frozen: botocore.credentials.ReadOnlyCredentials | None = None
        self._failures = 0
        # Since when every message received named only ids other replicas own (None: the
        # last receive brought one of ours, or nothing): the backlog `release_visibility` hides.
        self._foreign_since: float | None = None

    def held_secrets(self) -> tuple[str, ...]:
        """The AWS secret key and session token last used, for the log mask (no I/O)."""
        frozen = self._frozen
        if frozen is None:
            return ()
        return tuple(s for s in (frozen.secret_key, frozen.token) if s)

    async def run(self) -> None:
        """Receive, handle and delete until cancelled; never raises for a queue problem."""
        log.info(
            "notification_queue_receiving",
            queue_url=self._settings.queue_url,
            region=self._settings.region,
            endpoint_url=self._settings.endpoint_url or None,
        )
        try:
            while True:
                await self._once()
        finally:
            # After the receive in flight (whose messages, if nobody takes them, go back to
            # the queue at once: `_hand_back`), the client's connection is closed.
            self._worker.close(self._close_client)

    async def _once(self) -> None:
        try:
            batch = await self._worker.run(self._receive, self._hand_back)
        except Exception as error:  # botocore raises many types; each is counted and retried
            await self._failed(error, "receive")
            return
        if self._failures:
            log.info("notification_queue_recovered", after_failures=self._failures)
            self._failures = 0
        if not batch:
            self._foreign_since = None  # nothing visible is left to go through
            if self._settings.wait_seconds == 0:
                await self._sleep(SHORT_POLL_PAUSE_SECONDS)
            return
        given: set[str] = set()  # the handles a delete or a release has taken
        try:
            await self._handle(batch, given)
        except asyncio.CancelledError:
            # Stopped mid-batch (a reload, a stop): what no delete or release took is made
            # visible again at once, as a long poll's late messages are (`_hand_back`).
            left = [message for message in batch if message.handle not in given]
            if left:
                self._worker.later(functools.partial(self._hand_back, left))
            raise

    async def _handle(self, batch: list[Received], given: set[str]) -> None:
        """Handle a batch, then delete it, putting back what other replicas own; `given`
        gets each handle as its delete or release call is queued (from then on it runs)."""
        received_at = self._clock()
        self._metrics.last_received.set(time.time())
        done: list[str] = []
        released: list[tuple[str, int]] = []  # receipt handle, receive count
        for message in batch:
            try:
                back = await self._handler.handle(
                    message.parsed, received_at, message.receive_count
                )
            except Exception:
                # A bug of ours: the message is still deleted, or it would come back forever.
                log.exception("notification_handling_crashed")
                back = False
            if message.handle and back:
                released.append((message.handle, message.receive_count))
            elif message.handle:
                done.append(message.handle)
        given.update(done)
        await self._dispose(done, self._delete, "delete", QueueErrorKind.DELETE_FAILED)
        if released and len(released) == len(batch):
            if self._foreign_since is None:
                self._foreign_since = received_at
        else:
            self._foreign_since = None
        foreign_for = 0.0 if self._foreign_since is None else received_at - self._foreign_since
        handles = [handle for handle, _ in released]
        visible_in = [release_visibility(n, self._rng, foreign_for) for _, n in released]
        given.update(handles)
        await self._dispose(
            handles,
            lambda handles: self._release(handles, visible_in),
            "release",
            QueueErrorKind.RELEASE_FAILED,
        )
        if released and foreign_for == 0.0:  # not in a backlog, where it would only slow us
            await self._sleep(self._rng.uniform(0.0, RELEASE_PAUSE_SECONDS))

    async def _dispose(
        self,
        handles: list[str],
        call: Callable[[list[str]], int],
        name: str,
        failed_kind: QueueErrorKind,
    ) -> None:
        """Delete or release a batch; a message left over comes back after the queue's
        visibility timeout, so a failure is counted and never retried here."""
        if not handles:
            return
        try:
            failed = await self._worker.run(lambda: call(handles))
        except Exception as error:
            await self._failed(error, name)
            return
        if failed:
            self._metrics.errors.labels(failed_kind.value).inc(failed)
            log.warning(f"notification_{name}_failed", messages=failed)

    async def _failed(self, error: Exception, call: str) -> None:
        self._failures += 1
        kind = classify_error(error)
        self._metrics.errors.labels(kind.value).inc()
        delay = backoff_delay(
            self._failures,
            base=INITIAL_BACKOFF_SECONDS,
            cap=self._settings.max_backoff_seconds,
            rng=self._rng,
        )
        if kind is QueueErrorKind.CREDENTIALS and self._session is not None:
            # Missing, expired or refused: the next client reads the chain again.
            self._sessions.forget(self._session)
        if kind is QueueErrorKind.CREDENTIALS or isinstance(error, ConnectionError):
            # Built again on the next call.
            await self._worker.run(functools.partial(_quietly, self._close_client))
        log.warning(
            "notification_queue_error",
            call=call,
            kind=kind.value,
            error=describe_error(error),
            consecutive_failures=self._failures,
            retry_in_seconds=round(delay, 3),
        )
        await self._sleep(delay)

    # The methods below run on the worker thread.

    def _sqs(self) -> Any:
        if self._client is None:
            self._client, self._session, self._credentials = self._sessions.client(self._settings)
        return self._client

    def _close_client(self) -> None:
        """Close the client's connections; the next call builds another."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _hand_back(self, batch: list[Received]) -> None:
        """Messages received after the receiver stopped waiting (a reload, a stop): visible
        again at once, for the next receiver, instead of after the queue's visibility timeout."""
        handles = [message.handle for message in batch if message.handle]
        if not handles:
            return
        failed = self._release(handles, [0] * len(handles))
        log.info("notification_messages_handed_back", messages=len(handles), failed=failed)

    def _freeze(self) -> None:
        credentials = self._credentials
        if credentials is not None:
            self._frozen = credentials.get_frozen_credentials()

    def _receive(self) -> list[Received]:
        client = self._sqs()
        try:
            answer = client.receive_message(
                QueueUrl=self._settings.queue_url,
                MaxNumberOfMessages=self._settings.max_messages,
                WaitTimeSeconds=self._settings.wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        finally:
            self._freeze()
        return [
            Received(
                str(message.get("ReceiptHandle", "")),
                parse_message(message.get("Body")),
                _receive_count(message),
            )
            for message in answer.get("Messages", [])
        ]

    def _delete(self, handles: list[str]) -> int:
        """Delete a batch (at most 10, as received); how many could not be deleted."""
        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles)]
        answer = self._sqs().delete_message_batch(
            QueueUrl=self._settings.queue_url, Entries=entries
        )
        return len(answer.get("Failed", []))

    def _release(self, handles: list[str], visible_in: list[int]) -> int:
        """Make a batch visible again after `visible_in` seconds each, for another replica;
        how many could not be."""
        entries = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": seconds}
            for i, (h, seconds) in enumerate(zip(handles, visible_in, strict=True))
        ]
        answer = self._sqs().change_message_visibility_batch(
            QueueUrl=self._settings.queue_url, Entries=entries
        )
        return len(answer.get("Failed", []))


def _receive_count(message: dict[str, Any]) -> int:
    """SQS's ApproximateReceiveCount of a message (1 when missing or unreadable)."""
    try:
        return max(1, int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1)))
    except (TypeError, ValueError, AttributeError):
        return 1
