"""The admin API over real HTTP on loopback, backed by a real tracker, store and state file.

Every response any test sees is recorded with its route template; each test's teardown checks
that the OpenAPI document lists that status for that operation and that each JSON body is
valid against the schema the document gives it, so the document cannot drift from what the
API really answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from yarl import URL

from exporter import admin as admin_module
from exporter import register
from exporter.admin import create_admin_app, openapi_document
from exporter.auth import TOKEN_RECHECK_SECONDS
from exporter.config import ConfigError, parse_config
from exporter.logs import configure_logging
from exporter.models import Status, StatusReport
from exporter.sharding import Shard, shard_of
from exporter.state_writer import Persistence, UnavailableState, open_state
from exporter.tracking import UNSHARDED, IngestionTracker, RejectReason, Source
from exporter.uploads import UploadStore
from tests.conftest import free_port, launch_exporter, wait_for

NOW = 1718000000.5  # 2024-06-10T06:13:20.500Z
HOSTILE_ID = 'shelf/42 "summer" Grüße %2F?#'

Observed = set[tuple[str, str | None, int]]
#: JSON answers as sent: (method, route template, status, body).
Sent = list[tuple[str, str | None, int, bytes]]


@dataclass
class Answer:
    """One HTTP answer: status, headers and the body (parsed JSON, or None when empty)."""

    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes


@dataclass
class Admin:
    """A running admin API with the tracker behind it and what it has done."""

    url: str
    tracker: IngestionTracker
    store: UploadStore
    state_path: Path
    logs: io.StringIO
    session: ClientSession
    rejected: list[RejectReason] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send a request; `path` is sent exactly as given (already percent-encoded)."""
        sent = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, URL(self.url + path, encoded=True), data=data, headers=sent
        ) as response:
            raw = await response.read()
            assert response.content_type == "application/json" or not raw
            answer = Answer(
                response.status, dict(response.headers), json.loads(raw) if raw else None, raw
            )
        self.answers.append(answer)
        return answer

    async def post(self, body: object, **headers: str) -> Answer:
        """POST a registration."""
        return await self.call("POST", "/api/v1/ingestions", body=body, headers=headers)


AdminFactory = Callable[..., Awaitable[Admin]]


def id_path(ingestion_id: str) -> str:
    """The URL path of one ingestion, its id percent-encoded."""
    return "/api/v1/ingestions/" + quote(ingestion_id, safe="")


def recorder(observed: Observed, sent: Sent) -> Any:
    """A middleware recording (method, route template, status) of every answer, and the
    bodies of the JSON ones."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        resource = request.match_info.route.resource
        template = resource.canonical if resource else None
        observed.add((request.method, template, response.status))
        if isinstance(response, web.Response) and response.content_type == "application/json":
            assert isinstance(response.body, bytes)
            sent.append((request.method, template, response.status, response.body))
        return response

    return record


def undocumented(observed: Observed) -> list[tuple[str, str | None, int]]:
    """Observed answers of a route that the OpenAPI document does not list."""
    paths = openapi_document()["paths"]
    return sorted(
        (method, template, status)
        for method, template, status in observed
        if template is not None and str(status) not in paths[template][method.lower()]["responses"]
    )


def off_schema(sent: Sent) -> list[str]:
    """JSON answers that the schema the OpenAPI document gives them refuses.

    An answer outside every route (an unknown path, a wrong method) must be an Error.
    """
    document = openapi_document()
    problems = []
    for method, template, status, body in sent:
        if template is None:
            schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
        else:
            answers = document["paths"][template][method.lower()]["responses"]
            if str(status) not in answers:
                continue  # undocumented() reports it
            schema = answers[str(status)]["content"]["application/json"]["schema"]
        validator = Draft202012Validator(
            {**schema, "components": document["components"]},
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        problems.extend(
            f"{method} {template} {status}: {error.message}"
            for error in validator.iter_errors(json.loads(body))
        )
    return problems


@pytest.fixture
async def start_admin(tmp_path: Path) -> AsyncIterator[AdminFactory]:
    """Start admin APIs: `admin = await start_admin(labels=("team",), token_file=...)`."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []
    writers: list[asyncio.Task[None]] = []
    observed: Observed = set()
    sent: Sent = []

    async def start(
        *,
        labels: tuple[str, ...] = ("team",),
        max_tracked: int = 100,
        token_file: str = "",
        state_path: Path | None = None,
        port: int = 0,
        shard: Shard = UNSHARDED,
    ) -> Admin:
        logs = io.StringIO()
        configure_logging("debug", "json", stream=logs)
        store = UploadStore(clock=lambda: NOW)
        rejected: list[RejectReason] = []
        removed: list[str] = []
        tracker = IngestionTracker(
            store,
            max_tracked=max_tracked,
            label_names=labels,
            on_added=lambda ids: None,
            on_removed=removed.extend,
            on_rejected=rejected.append,
            shard=shard,
            clock=lambda: NOW,
        )
        path = state_path or tmp_path / "state.db"
        # An hour's debounce: only a durable flush can have written the file during a test.
        writer, result = await open_state(
            path,
            record=tracker.record,
            retired_at=tracker.retired_at,
            debounce_seconds=3600,
            busy_timeout_seconds=0.05,
        )
        state: Persistence = writer or UnavailableState(path, result.problem or "")
        tracker.attach_state(state)
        if writer is not None:
            writers.append(asyncio.create_task(writer.run()))
        app = create_admin_app(tracker, token_file=token_file)
        app.middlewares.insert(0, recorder(observed, sent))
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        servers.append(server)
        session = ClientSession()
        sessions.append(session)
        url = str(server.make_url("")).rstrip("/")
        return Admin(url, tracker, store, path, logs, session, rejected, removed)

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()
    for task in writers:
        task.cancel()
    await asyncio.gather(*writers, return_exceptions=True)
    assert not undocumented(observed), "answers missing from the OpenAPI document"
    assert sent, "no JSON answer recorded"
    assert off_schema(sent) == [], "answers that do not match their documented schema"


@pytest.fixture
async def admin(start_admin: AdminFactory) -> Admin:
    """An admin API with the label `team` allow-listed and no token."""
    return await start_admin()


def on_disk(admin: Admin) -> list[str]:
    """The ids the state database holds right now (read by a connection of our own)."""
    with contextlib.closing(sqlite3.connect(admin.state_path)) as db:
        return [i for (i,) in db.execute("SELECT ingestion_id FROM uploads ORDER BY rowid")]


# -- registering --------------------------------------------------------------------------------


async def test_registering_a_new_id_answers_201_with_its_view_and_location(admin: Admin) -> None:
    """A new id is tracked for the API: 201, its view, and a Location naming it."""
    answer = await admin.post({"ingestionId": "upload-1", "labels": {"team": "pricing"}})
    assert answer.status == 201
    assert answer.headers["Location"] == "/api/v1/ingestions/upload-1"
    assert answer.body == {
        "ingestionId": "upload-1",
        "status": "UNKNOWN",
        "sources": ["api"],
        "labels": {"team": "pricing"},
        "firstSeen": "2024-06-10T06:13:20.500Z",
        "statusChanged": "2024-06-10T06:13:20.500Z",
        "lastPoll": None,
        "lastSuccess": None,
        "lastErrorKind": None,
        "terminalAt": None,
        "reportAvailable": False,
    }
    assert admin.tracker.ids_from(Source.API) == {"upload-1"}


async def test_the_state_file_holds_the_id_when_the_201_arrives(admin: Admin) -> None:
    """A 2xx is an acknowledgement: the id is already in the state file on disk."""
    assert on_disk(admin) == []
    answer = await admin.post({"ingestionId": "durable-1"})
    assert answer.status == 201
    assert on_disk(admin) == ["durable-1"]


async def test_registering_again_answers_200_and_replaces_the_labels(admin: Admin) -> None:
    """Registration is idempotent: a second POST answers 200 with the same upload."""
    first = await admin.post({"ingestionId": "again", "labels": {"team": "a"}})
    second = await admin.post({"ingestionId": "again", "labels": {"team": "b"}})
    assert (first.status, second.status) == (201, 200)
    assert "Location" not in second.headers
    assert second.body["labels"] == {"team": "b"}
    assert len(admin.store) == 1


async def test_registering_again_with_other_labels_logs_labels_replaced(admin: Admin) -> None:
    """A repeat POST with different labels replaces them and logs so; the same labels do not."""
    await admin.post({"ingestionId": "relabel", "labels": {"team": "a"}})
    await admin.post({"ingestionId": "relabel", "labels": {"team": "b"}})
    await admin.post({"ingestionId": "relabel", "labels": {"team": "b"}})
    await admin.post({"ingestionId": "relabel"})  # no labels: the ones held stay
    lines = [json.loads(line) for line in admin.logs.getvalue().splitlines()]
    replaced = [e for e in lines if e["event"] == "labels_replaced"]
    assert [(e["old_labels"], e["new_labels"]) for e in replaced] == [
        ({"team": "a"}, {"team": "b"})
    ]
    assert dict(admin.store.get("relabel").labels) == {"team": "b"}  # type: ignore[union-attr]


async def test_the_location_header_percent_encodes_the_id(admin: Admin) -> None:
    """The Location of an id with reserved characters is usable as is."""
    answer = await admin.post({"ingestionId": HOSTILE_ID})
    assert answer.status == 201
    assert answer.headers["Location"] == id_path(HOSTILE_ID)
    again = await admin.call("GET", answer.headers["Location"])
    assert again.body["ingestionId"] == HOSTILE_ID


@pytest.mark.parametrize(
    ("ingestion_id", "reason"),
    [
        ("x" * 256, RejectReason.TOO_LONG),
        ("line\nbreak", RejectReason.CONTROL_CHARACTERS),
        ("look\u202ealike", RejectReason.FORMAT_CHARACTERS),
        ("cafe\u0301", RejectReason.NOT_NFC),
        ("", RejectReason.EMPTY),
        (12345, RejectReason.NOT_A_STRING),
        (None, RejectReason.NOT_A_STRING),
    ],
)
async def test_an_invalid_id_is_refused_with_its_reason_and_counted(
    admin: Admin, ingestion_id: object, reason: RejectReason
) -> None:
    """Each rejection answers 400 with the reason as its code, and is counted once."""
    answer = await admin.post({"ingestionId": ingestion_id})
    assert answer.status == 400
    assert answer.body["error"] == reason.value
    assert answer.body["message"]
    assert admin.rejected == [reason]
    assert len(admin.store) == 0


async def test_a_missing_id_is_refused_as_not_a_string(admin: Admin) -> None:
    """A body without ingestionId says so, and counts as not_a_string."""
    answer = await admin.post({"labels": {"team": "x"}})
    assert answer.status == 400
    assert answer.body == {"error": "not_a_string", "message": "ingestionId is required"}
    assert admin.rejected == [RejectReason.NOT_A_STRING]


async def test_labels_that_are_not_allow_listed_are_refused_as_bad_labels(admin: Admin) -> None:
    """Only allow-listed label names (and string values) are accepted."""
    unknown = await admin.post({"ingestionId": "l1", "labels": {"owner": "me"}})
    not_string = await admin.post({"ingestionId": "l2", "labels": {"team": 7}})
    assert (unknown.status, not_string.status) == (400, 400)
    assert unknown.body["error"] == not_string.body["error"] == "bad_labels"
    assert "owner" in unknown.body["message"]
    assert admin.rejected == [RejectReason.BAD_LABELS, RejectReason.BAD_LABELS]
    assert len(admin.store) == 0


async def test_the_cap_answers_409_cap_reached(start_admin: AdminFactory) -> None:
    """Past ingestions.max_tracked a new id is refused with 409; a tracked one still answers."""
    admin = await start_admin(max_tracked=2)
    for name in ("c1", "c2"):
        assert (await admin.post({"ingestionId": name})).status == 201
    refused = await admin.post({"ingestionId": "c3"})
    assert refused.status == 409
    assert refused.body["error"] == "cap_reached"
    assert admin.rejected == [RejectReason.CAP_REACHED]
    assert (await admin.post({"ingestionId": "c1"})).status == 200


async def test_an_id_another_shard_owns_answers_409_naming_the_owner(
    start_admin: AdminFactory,
) -> None:
    """With sharding, a registration sent to the wrong replica is refused with 409 not_owned."""
    admin = await start_admin(shard=Shard(index=0, total=3))
    foreign = next(f"id-{n}" for n in range(100) if shard_of(f"id-{n}", 3) != 0)
    refused = await admin.post({"ingestionId": foreign})
    assert refused.status == 409
    assert refused.body["error"] == "not_owned"
    assert f"owned by shard {shard_of(foreign, 3)} of 3" in refused.body["message"]
    assert len(admin.store) == 0
    own = next(f"id-{n}" for n in range(100) if shard_of(f"id-{n}", 3) == 0)
    assert (await admin.post({"ingestionId": own})).status == 201


@pytest.mark.parametrize(
    ("data", "content_type", "status", "error"),
    [
        (b'{"ingestionId": ', "application/json", 400, "invalid_json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "invalid_json"),
        (b'["an-id"]', "application/json", 400, "invalid_json"),
        (b'{"ingestionId": "a\\ud800b"}', "application/json", 400, "invalid_json"),
        (b'{"ingestionId": "a", "labels": {"team": "\\udfff"}}', "application/json", 400, None),
        (b'{"ingestionId": "a", "lables": {}}', "application/json", 400, "unknown_field"),
        (b'{"ingestionId": "a", "labels": ["team"]}', "application/json", 400, "invalid_field"),
        (b'{"ingestionId": "a"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"ingestionId": "a"}', "application/x-www-form-urlencoded", 415, None),
        (b'{"ingestionId": "' + b"x" * 70_000 + b'"}', "application/json", 413, None),
    ],
)
async def test_a_malformed_request_gets_a_json_error(
    admin: Admin, data: bytes, content_type: str, status: int, error: str | None
) -> None:
    """Bad JSON, bad shapes, wrong content types and big bodies answer JSON errors."""
    answer = await admin.call(
        "POST", "/api/v1/ingestions", data=data, headers={"Content-Type": content_type}
    )
    assert answer.status == status
    assert set(answer.body) == {"error", "message"}
    assert answer.body["error"] == (error or answer.body["error"])
    assert len(admin.store) == 0 and admin.rejected == []


async def test_a_body_starting_with_a_byte_order_mark_is_accepted(admin: Admin) -> None:
    """UTF-8 with a BOM, as some Windows tools send it, registers the id."""
    data = b"\xef\xbb\xbf" + json.dumps({"ingestionId": "bom-1"}).encode()
    answer = await admin.call(
        "POST", "/api/v1/ingestions", data=data, headers={"Content-Type": "application/json"}
    )
    assert answer.status == 201
    assert answer.body["ingestionId"] == "bom-1"


async def test_a_json_content_type_with_charset_or_suffix_is_accepted(admin: Admin) -> None:
    """application/json; charset=utf-8 and application/*+json both count as JSON."""
    for n, content_type in enumerate(("application/json; charset=utf-8", "application/x+json")):
        answer = await admin.call(
            "POST",
            "/api/v1/ingestions",
            data=json.dumps({"ingestionId": f"ct-{n}"}).encode(),
            headers={"Content-Type": content_type},
        )
        assert answer.status == 201


async def test_a_state_write_failure_answers_503_and_is_not_acknowledged(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """When the state file cannot be written the client is told to retry: no 2xx."""
    admin = await start_admin(state_path=tmp_path / "missing-dir" / "state.json")
    answer = await admin.post({"ingestionId": "not-durable"})
    assert answer.status == 503
    assert answer.body["error"] == "state_unavailable"
    assert "missing-dir" not in answer.body["message"]


def break_state_writes(admin: Admin) -> sqlite3.Connection:
    """Make every state write fail for real: another connection holds the write lock, so the
    writer's transactions end in "database is locked" after its busy timeout."""
    db = sqlite3.connect(admin.state_path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    return db


def repair_state_writes(lock: sqlite3.Connection) -> None:
    """Undo `break_state_writes`."""
    lock.execute("ROLLBACK")
    lock.close()


async def test_a_registration_answered_503_leaves_no_trace(admin: Admin) -> None:
    """A 503 POST is rolled back: not tracked, no series, and not in any later write."""
    assert (await admin.post({"ingestionId": "acked"})).status == 201
    lock = break_state_writes(admin)

    answer = await admin.post({"ingestionId": "refused", "labels": {"team": "x"}})
    relabel = await admin.post({"ingestionId": "acked", "labels": {"team": "new"}})

    assert (answer.status, relabel.status) == (503, 503)
    assert (await admin.call("GET", "/api/v1/ingestions/refused")).status == 404
    assert admin.tracker.view("refused") is None and "refused" not in admin.store
    assert admin.removed == ["refused"]  # the poller was told to forget it
    assert dict(admin.store.get("acked").labels) == {}  # type: ignore[union-attr]
    repair_state_writes(lock)
    assert (await admin.post({"ingestionId": "later"})).status == 201
    assert on_disk(admin) == ["acked", "later"]


async def test_a_delete_answered_503_leaves_the_id_tracked_and_persisted(admin: Admin) -> None:
    """A 503 DELETE is rolled back: the id stays tracked for the API and in later writes."""
    assert (await admin.post({"ingestionId": "kept", "labels": {"team": "a"}})).status == 201
    lock = break_state_writes(admin)

    answer = await admin.call("DELETE", "/api/v1/ingestions/kept")

    assert answer.status == 503 and answer.body["error"] == "state_unavailable"
    shown = await admin.call("GET", "/api/v1/ingestions/kept")
    assert shown.status == 200 and shown.body["sources"] == ["api"]
    assert shown.body["labels"] == {"team": "a"}
    repair_state_writes(lock)
    assert (await admin.post({"ingestionId": "later"})).status == 201
    assert on_disk(admin) == ["kept", "later"]
    assert (await admin.call("DELETE", "/api/v1/ingestions/kept")).status == 204


async def test_a_retired_id_is_accepted_but_not_tracked_again(admin: Admin) -> None:
    """An id that finished and was retired answers 200 saying so, and is not polled again."""
    assert (await admin.post({"ingestionId": "old"})).status == 201
    admin.store.retire("old")
    answer = await admin.post({"ingestionId": "old"})
    assert answer.status == 200
    assert answer.body["retired"] is True and answer.body["ingestionId"] == "old"
    assert admin.tracker.view("old") is None


# -- reading ------------------------------------------------------------------------------------


async def test_listing_returns_every_upload_and_filters_by_status(admin: Admin) -> None:
    """GET lists uploads in id order; ?status= keeps only those statuses."""
    for name in ("c", "a", "b"):
        await admin.post({"ingestionId": name})
    admin.store.record_report("b", StatusReport(Status.FATAL.value, True, "FATAL"))
    admin.store.record_report("c", StatusReport(Status.DONE.value, False, "DONE"))
    everything = await admin.call("GET", "/api/v1/ingestions")
    assert [v["ingestionId"] for v in everything.body["ingestions"]] == ["a", "b", "c"]
    assert everything.body["nextCursor"] is None
    fatal = await admin.call("GET", "/api/v1/ingestions?status=FATAL")
    assert [v["ingestionId"] for v in fatal.body["ingestions"]] == ["b"]
    view = fatal.body["ingestions"][0]
    assert view["terminalAt"] == view["lastSuccess"] == "2024-06-10T06:13:20.500Z"
    assert view["reportAvailable"] is True
    two = await admin.call("GET", "/api/v1/ingestions?status=fatal&status=DONE")
    assert [v["ingestionId"] for v in two.body["ingestions"]] == ["b", "c"]


async def test_listing_refuses_an_unknown_status_naming_the_allowed_ones(admin: Admin) -> None:
    """?status=BOGUS is a 400 that lists the statuses, not an empty list that reads "none"."""
    await admin.post({"ingestionId": "s1"})
    answer = await admin.call("GET", "/api/v1/ingestions?status=FATAL&status=BOGUS")
    assert answer.status == 400
    assert answer.body["error"] == "invalid_parameter"
    assert "'BOGUS'" in answer.body["message"]
    assert "INQUEUE, INPROGRESS, DONE, CANCELLED, FATAL, INVALID, UNKNOWN" in answer.body["message"]


async def test_listing_names_a_status_the_api_sent_outside_the_documented_set_other(
    admin: Admin,
) -> None:
    """An upload in a status the API invented is listed, and filtered, as OTHER; the value
    itself is never a filter (nor a label value)."""
    await admin.post({"ingestionId": "novel"})
    admin.store.record_report("novel", StatusReport("ON_HOLD", False, "ON_HOLD", known=False))
    other = await admin.call("GET", "/api/v1/ingestions?status=other")
    assert other.status == 200
    assert [(v["ingestionId"], v["status"]) for v in other.body["ingestions"]] == [
        ("novel", "OTHER")
    ]
    assert (await admin.call("GET", "/api/v1/ingestions?status=ON_HOLD")).status == 400


async def walk(
    admin: Admin, query: str = "", between: Callable[[], Awaitable[None]] | None = None
) -> list[str]:
    """Every id GET /api/v1/ingestions lists, following nextCursor to the end."""
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10_000):
        suffix = "" if cursor is None else f"&cursor={cursor}"
        page = await admin.call("GET", f"/api/v1/ingestions?{query}{suffix}")
        assert page.status == 200, page.body
        seen += [view["ingestionId"] for view in page.body["ingestions"]]
        cursor = page.body["nextCursor"]
        if cursor is None:
            return seen
        if between is not None:
            await between()
    raise AssertionError("the pages never end")


def hostile_ids(n: int) -> list[str]:
    """`n` distinct ids mixing ASCII, reserved URL characters and non-ASCII text."""
    shapes = ("upload-{:05d}", "é/{:05d}?#%", "{:05d} 😀", "Z{:05d}", "a{:05d}&cursor=x")
    return [shapes[i % len(shapes)].format(i) for i in range(n)]


async def test_walking_every_page_lists_each_id_exactly_once(start_admin: AdminFactory) -> None:
    """Pages in id order, joined, are every tracked id once; the last page says so."""
    admin = await start_admin(max_tracked=5_000)
    ids = hostile_ids(2_345)
    admin.tracker.replace_config_ids(ids[:-5])
    for ingestion_id in ids[-5:]:
        assert (await admin.post({"ingestionId": ingestion_id})).status == 201
    for query in ("limit=100", "limit=2345", "limit=2344", ""):
        assert await walk(admin, query) == sorted(ids)
    assert await walk(admin, "limit=7&status=UNKNOWN") == sorted(ids)
    first = await admin.call("GET", "/api/v1/ingestions")
    assert len(first.body["ingestions"]) == 1_000  # the default page
    assert first.body["nextCursor"] is not None
    whole = await admin.call("GET", "/api/v1/ingestions?limit=10000")
    assert len(whole.body["ingestions"]) == 2_345 and whole.body["nextCursor"] is None


async def test_ids_removed_or_added_between_pages_do_not_make_a_survivor_skip(
    start_admin: AdminFactory,
) -> None:
    """Deleting listed, unlisted and cursor ids and adding new ones mid-walk skips no survivor."""
    admin = await start_admin(max_tracked=5_000)
    ids = sorted(hostile_ids(600))
    admin.tracker.replace_config_ids(ids)
    held = list(ids)
    removed: set[str] = set()
    added: set[str] = set()
    state = {"round": 0}

    async def churn() -> None:
        state["round"] += 1
        n = state["round"]
        # Drop every 37th id still held, from a shifting start: some already listed, some
        # not yet, sometimes the cursor's own; add ids that sort before, among and after.
        for victim in held[n % 10 :: 37]:
            removed.add(victim)
        fresh = [f"{held[(n * 13) % len(held)]}-new-{n}", f"0-new-{n}", f"zzz-new-{n}"]
        added.update(fresh)
        keep = [i for i in held if i not in removed]
        held[:] = keep
        admin.tracker.replace_config_ids([*held, *sorted(added)])

    seen = await walk(admin, "limit=25", between=churn)
    survivors = [i for i in ids if i not in removed]
    assert state["round"] > 10 and removed
    assert all(admin.tracker.view(i) is None for i in removed)
    assert len(seen) == len(set(seen)), "an id was listed twice"
    assert set(survivors) <= set(seen), "a survivor was skipped"
    assert set(seen) <= set(ids) | added
    assert seen == sorted(seen)


async def test_deleting_the_cursor_id_itself_does_not_lose_the_place(admin: Admin) -> None:
    """The cursor holds a position, not a reference: its id may be gone by the next page."""
    for name in ("a", "b", "c", "d"):
        await admin.post({"ingestionId": name})
    first = await admin.call("GET", "/api/v1/ingestions?limit=2")
    assert [v["ingestionId"] for v in first.body["ingestions"]] == ["a", "b"]
    assert (await admin.call("DELETE", id_path("b"))).status == 204
    rest = await admin.call("GET", f"/api/v1/ingestions?limit=2&cursor={first.body['nextCursor']}")
    assert [v["ingestionId"] for v in rest.body["ingestions"]] == ["c", "d"]
    assert rest.body["nextCursor"] is None


async def test_a_filtered_walk_finds_rare_statuses_over_short_pages(
    start_admin: AdminFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page looks at a bounded number of ids; walking on still finds every match."""
    monkeypatch.setattr(admin_module, "MAX_PAGE_EXAMINED", 40)
    admin = await start_admin(max_tracked=1_000)
    ids = [f"id-{n:04d}" for n in range(500)]
    admin.tracker.replace_config_ids(ids)
    fatal = ids[3::97]
    for ingestion_id in fatal:
        admin.store.record_report(ingestion_id, StatusReport(Status.FATAL.value, False, "FATAL"))
    first = await admin.call("GET", "/api/v1/ingestions?status=FATAL&limit=10")
    assert len(first.body["ingestions"]) < 10 and first.body["nextCursor"] is not None
    assert await walk(admin, "status=FATAL&limit=10") == fatal
    assert await walk(admin, "status=FATAL&limit=1") == fatal


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=10001",
        "limit=1000000",
        "limit=0001000000",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=%C2%B2",
        "limit=5&limit=6",
        "cursor=!!!",
        "cursor=",
        "cursor=_w",
        "cursor=" + "QQ" * 2000,
        "cursor=YQ&cursor=Yg",
    ],
)
async def test_a_bad_limit_or_cursor_answers_400(admin: Admin, query: str) -> None:
    """limit outside 1-10000, a cursor this API did not hand out, or either twice: 400."""
    await admin.post({"ingestionId": "a"})
    answer = await admin.call("GET", f"/api/v1/ingestions?{query}")
    assert answer.status == 400
    assert answer.body["error"] == "invalid_parameter"
    assert ("limit" in query) == ("limit" in answer.body["message"])


async def test_listing_refuses_unknown_query_parameters(admin: Admin) -> None:
    """A misspelt filter is an error, not a silently unfiltered list."""
    answer = await admin.call("GET", "/api/v1/ingestions?state=FATAL")
    assert answer.status == 400
    assert answer.body["error"] == "unknown_parameter"


async def test_a_hostile_but_valid_id_round_trips_through_the_url(admin: Admin) -> None:
    """An id with '/', spaces, quotes, '%' and non-ASCII is reachable percent-encoded."""
    assert (await admin.post({"ingestionId": HOSTILE_ID})).status == 201
    answer = await admin.call("GET", id_path(HOSTILE_ID))
    assert answer.status == 200
    assert answer.body["ingestionId"] == HOSTILE_ID
    assert (await admin.call("GET", id_path("shelf/42"))).status == 404
    assert (await admin.call("DELETE", id_path(HOSTILE_ID))).status == 204


async def test_an_unknown_id_and_an_unknown_path_answer_404_json(admin: Admin) -> None:
    """404s are JSON errors, whether the id or the endpoint is unknown."""
    unknown_id = await admin.call("GET", id_path("nope"))
    unknown_path = await admin.call("GET", "/api/v2/whatever")
    assert (unknown_id.status, unknown_path.status) == (404, 404)
    assert unknown_id.body["error"] == unknown_path.body["error"] == "not_found"


async def test_a_wrong_method_answers_405_json_with_allow(admin: Admin) -> None:
    """A method the endpoint lacks answers a JSON 405 that lists the allowed ones."""
    answer = await admin.call("PUT", "/api/v1/ingestions", body={"ingestionId": "x"})
    assert answer.status == 405
    assert answer.body["error"] == "method_not_allowed"
    assert set(answer.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_an_unexpected_failure_answers_500_without_details(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in a handler is a JSON 500 that reveals nothing about it."""

    def broken(*args: object) -> list[Any]:
        msg = "internal detail at /secret/path"
        raise RuntimeError(msg)

    monkeypatch.setattr(admin.tracker, "page", broken)
    answer = await admin.call("GET", "/api/v1/ingestions")
    assert answer.status == 500
    assert answer.body == {
        "error": "internal_error",
        "message": "internal error; see the exporter's log",
    }
    assert "admin_request_failed" in admin.logs.getvalue()


async def test_healthz_answers_json(admin: Admin) -> None:
    """The admin listener's health check is JSON too."""
    answer = await admin.call("GET", "/healthz")
    assert (answer.status, answer.body) == (200, {"status": "ok"})


# -- deleting -----------------------------------------------------------------------------------


async def test_deleting_an_api_id_answers_204_and_its_series_go(admin: Admin) -> None:
    """DELETE of an id only the API held removes it at once, durably."""
    await admin.post({"ingestionId": "gone"})
    answer = await admin.call("DELETE", id_path("gone"))
    assert (answer.status, answer.raw) == (204, b"")
    assert admin.tracker.view("gone") is None
    assert admin.removed == ["gone"]
    assert on_disk(admin) == []
    assert (await admin.call("DELETE", id_path("gone"))).status == 404


async def test_deleting_an_id_also_held_by_config_answers_200_naming_the_holder(
    admin: Admin,
) -> None:
    """When another source still holds the id it stays tracked, and the answer says why."""
    admin.tracker.replace_config_ids(["shared"])
    await admin.post({"ingestionId": "shared"})
    answer = await admin.call("DELETE", id_path("shared"))
    assert answer.status == 200
    assert answer.body["ingestion"]["sources"] == ["config"]
    assert "config" in answer.body["message"]
    view = admin.tracker.view("shared")
    assert view is not None and view.sources == ("config",)


async def test_deleting_a_config_only_id_answers_409(admin: Admin) -> None:
    """The API cannot remove ids it did not register: that is done in the config."""
    admin.tracker.replace_config_ids(["from-config"])
    answer = await admin.call("DELETE", id_path("from-config"))
    assert answer.status == 409
    assert answer.body["error"] == "not_registered_by_api"
    assert "config" in answer.body["message"]
    assert admin.tracker.view("from-config") is not None


async def test_any_id_can_be_deleted_by_naming_its_sources_and_the_deletion_is_logged(
    admin: Admin,
) -> None:
    """?source= names the sources to release: an id a (forged) notification registered, or
    one the config holds, goes too; the audit line names the sources it had and released."""
    await admin.tracker.register("forged-1", Source.NOTIFICATION)
    refused = await admin.call("DELETE", id_path("forged-1"))
    assert (refused.status, refused.body["error"]) == (409, "not_registered_by_api")
    assert "?source=" in refused.body["message"] and "notification" in refused.body["message"]
    answer = await admin.call("DELETE", id_path("forged-1") + "?source=notification")
    assert answer.status == 204
    assert admin.tracker.view("forged-1") is None
    admin.tracker.replace_config_ids(["listed"])
    await admin.post({"ingestionId": "listed"})
    answer = await admin.call("DELETE", id_path("listed") + "?source=all")
    assert answer.status == 204
    assert admin.tracker.view("listed") is None and on_disk(admin) == []
    deleted = [
        json.loads(line)
        for line in admin.logs.getvalue().splitlines()
        if '"admin_ingestion_deleted"' in line
    ]
    assert [(d["ingestion_id"], d["sources_before"], d["released_sources"]) for d in deleted] == [
        ("forged-1", ["notification"], ["notification"]),
        ("listed", ["api", "config"], ["config", "api"]),
    ]


async def test_a_delete_naming_no_holding_or_an_unknown_source_is_refused(admin: Admin) -> None:
    """A source that does not hold the id: 409 not_held_by_source; a name that is no source,
    or another parameter: 400. The id stays tracked."""
    await admin.tracker.register("kept", Source.NOTIFICATION)
    answer = await admin.call("DELETE", id_path("kept") + "?source=directory")
    assert (answer.status, answer.body["error"]) == (409, "not_held_by_source")
    answer = await admin.call("DELETE", id_path("kept") + "?source=queue")
    assert (answer.status, answer.body["error"]) == (400, "invalid_parameter")
    answer = await admin.call("DELETE", id_path("kept") + "?sources=all")
    assert (answer.status, answer.body["error"]) == (400, "unknown_parameter")
    assert admin.tracker.view("kept") is not None


# -- the bearer token ---------------------------------------------------------------------------


def write_token(path: Path, token: str) -> None:
    """Replace the token file the way Kubernetes does: a new file renamed over the old."""
    temp = path.with_suffix(".new")
    temp.write_text(token + "\n")
    os.replace(temp, path)


async def test_the_token_is_required_when_configured(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """Without or with a wrong token: 401; with it: 200; health and the doc stay open."""
    token_file = tmp_path / "admin-token"
    write_token(token_file, "right-token-123")
    admin = await start_admin(token_file=str(token_file))
    missing = await admin.call("GET", "/api/v1/ingestions")
    wrong = await admin.call(
        "GET", "/api/v1/ingestions", headers={"Authorization": "Bearer wrong-token-999"}
    )
    unknown_path = await admin.call("GET", "/api/v1/secret-probe")
    for answer in (missing, wrong, unknown_path):
        assert answer.status == 401
        assert answer.body["error"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    right = await admin.call(
        "GET", "/api/v1/ingestions", headers={"Authorization": "bearer right-token-123"}
    )
    assert right.status == 200
    registered = await admin.post(
        {"ingestionId": "with-token"}, Authorization="Bearer right-token-123"
    )
    assert registered.status == 201
    assert (await admin.call("GET", "/healthz")).status == 200
    assert (await admin.call("GET", "/api/v1/openapi.json")).status == 200


async def test_a_replaced_token_file_takes_effect_without_a_restart(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """Rotating the token file swaps the accepted token within TOKEN_RECHECK_SECONDS (the
    file is not stat()ed on every request; tests/test_auth.py pins that with a fake clock)."""
    token_file = tmp_path / "admin-token"
    write_token(token_file, "first-token")
    admin = await start_admin(token_file=str(token_file))
    first = {"Authorization": "Bearer first-token"}
    second = {"Authorization": "Bearer second-token"}
    assert (await admin.call("GET", "/api/v1/ingestions", headers=first)).status == 200
    write_token(token_file, "second-token")

    async def first_refused() -> bool:
        return (await admin.call("GET", "/api/v1/ingestions", headers=first)).status == 401

    await wait_for(first_refused, timeout=TOKEN_RECHECK_SECONDS + 5)
    assert (await admin.call("GET", "/api/v1/ingestions", headers=second)).status == 200


async def test_an_unreadable_token_file_fails_closed(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """A token file that disappears locks the API instead of opening it."""
    token_file = tmp_path / "admin-token"
    write_token(token_file, "the-token")
    admin = await start_admin(token_file=str(token_file))
    token_file.unlink()
    answer = await admin.call(
        "GET", "/api/v1/ingestions", headers={"Authorization": "Bearer the-token"}
    )
    assert answer.status == 503
    assert answer.body["error"] == "auth_unavailable"


async def test_the_token_never_appears_in_responses_or_logs(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """Neither the real token nor a wrong one sent is echoed in any answer or log line."""
    token, wrong = "tok-S3CRET-admin-4242", "tok-WRONG-guess-7777"
    token_file = tmp_path / "admin-token"
    write_token(token_file, token)
    admin = await start_admin(token_file=str(token_file))
    good, bad = f"Bearer {token}", f"Bearer {wrong}"
    await admin.post({"ingestionId": "t1", "labels": {"team": "x"}}, Authorization=good)
    await admin.post({"ingestionId": "t1"}, Authorization=bad)
    await admin.post({"ingestionId": "t2", "labels": {"nope": "x"}}, Authorization=good)
    await admin.call("GET", "/api/v1/ingestions", headers={"Authorization": good})
    await admin.call("GET", "/api/v1/ingestions", headers={"Authorization": wrong})
    await admin.call("GET", id_path("t1"), headers={"Authorization": good})
    await admin.call("PATCH", id_path("t1"), headers={"Authorization": good})
    await admin.call("DELETE", id_path("t1"), headers={"Authorization": good})
    await admin.call("GET", "/api/v1/openapi.json")
    token_file.unlink()
    await admin.call("GET", "/api/v1/ingestions", headers={"Authorization": good})
    seen = (
        "\n".join(answer.raw.decode() + json.dumps(answer.headers) for answer in admin.answers)
        + admin.logs.getvalue()
    )
    assert "admin_ingestion_registered" in seen and "admin_request_unauthorized" in seen
    assert token not in seen and wrong not in seen
    assert "S3CRET" not in seen and "WRONG" not in seen


# -- the OpenAPI document -----------------------------------------------------------------------


async def test_the_openapi_document_served_is_a_valid_openapi_3_document(admin: Admin) -> None:
    """The served document passes openapi-spec-validator."""
    answer = await admin.call("GET", "/api/v1/openapi.json")
    assert answer.status == 200
    validate(answer.body)
    assert answer.body == openapi_document()


async def test_every_route_is_in_the_openapi_document_and_nothing_else() -> None:
    """The app's routes and the document's operations are the same set."""
    app = create_admin_app(
        IngestionTracker(
            UploadStore(),
            max_tracked=1,
            label_names=(),
            on_added=lambda ids: None,
            on_removed=lambda ids: None,
            on_rejected=lambda reason: None,
        )
    )
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    documented = {
        (method, path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented


def test_the_document_check_catches_an_undocumented_status() -> None:
    """The per-test check really fails on a status the document lacks."""
    assert undocumented({("GET", "/api/v1/ingestions", 418), ("GET", None, 404)}) == [
        ("GET", "/api/v1/ingestions", 418)
    ]


def test_the_schema_check_catches_a_body_the_document_does_not_describe() -> None:
    """The per-test check really fails on a missing field, a wrong type, a bad timestamp, an
    unknown source and an error that is no Error object."""
    one = "/api/v1/ingestions/{ingestion_id}"
    view = {
        "ingestionId": "a",
        "status": "DONE",
        "sources": ["api"],
        "labels": {},
        "firstSeen": "2024-06-10T06:13:20.500Z",
        "statusChanged": "2024-06-10T06:13:20.500Z",
        "lastPoll": None,
        "lastSuccess": None,
        "lastErrorKind": None,
        "terminalAt": None,
        "reportAvailable": False,
    }
    bad_bodies = [
        {key: value for key, value in view.items() if key != "reportAvailable"},
        {**view, "labels": {"team": 7}},
        {**view, "firstSeen": "yesterday"},
        {**view, "sources": ["somewhere"]},
    ]
    sent = [("GET", one, 200, json.dumps(body).encode()) for body in [view, *bad_bodies]]
    sent.append(("PUT", None, 405, b'{"error": "method_not_allowed"}'))
    problems = off_schema(sent)
    assert len(problems) == len(bad_bodies) + 1, problems


@pytest.mark.parametrize(
    "body",
    [
        {"ingestionId": "ok-1"},
        {"ingestionId": "ok-2", "labels": {"team": "t" * 128}},
        {"ingestionId": "ok-3", "labels": None},
        {"ingestionId": "x" * 255},
        {"ingestionId": "x" * 256},
        {"ingestionId": ""},
        {"ingestionId": 5},
        {"ingestionId": None},
        {"labels": {"team": "x"}},
        {"ingestionId": "a", "lables": {}},
        {"ingestionId": "a", "labels": ["team"]},
        {"ingestionId": "a", "labels": {"team": 7}},
        {"ingestionId": "a", "labels": {"team": "t" * 129}},
        ["a"],
    ],
)
async def test_the_documented_request_schema_accepts_what_the_api_accepts(
    admin: Admin, body: object
) -> None:
    """A body shape the RegisterRequest schema refuses is refused by the API, and the other
    way round (with allow-listed label names and printable ids)."""
    document = openapi_document()
    validator = Draft202012Validator(
        {"$ref": "#/components/schemas/RegisterRequest", "components": document["components"]}
    )
    answer = await admin.post(body)
    assert validator.is_valid(body) == (answer.status in (200, 201)), answer.body


# -- `catalog-upload-exporter register` ---------------------------------------------------------


async def test_register_command_tracks_the_id_and_prints_its_view(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """register ID --url --label: exit 0, the id is tracked for the API, its view printed."""
    code = await asyncio.to_thread(
        register.main, ["my-id", "--url", admin.url + "/", "--label", "team=x"]
    )
    assert code == 0
    view = admin.tracker.view("my-id")
    assert view is not None and view.sources == ("api",) and dict(view.labels) == {"team": "x"}
    printed = json.loads(capsys.readouterr().out)
    assert printed["ingestionId"] == "my-id" and printed["labels"] == {"team": "x"}
    assert on_disk(admin) == ["my-id"]


async def test_register_command_reads_the_url_from_the_environment(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CATALOG_EXPORTER_ADMIN_URL replaces the default URL."""
    monkeypatch.setenv("CATALOG_EXPORTER_ADMIN_URL", admin.url)
    assert await asyncio.to_thread(register.main, ["env-id"]) == 0
    assert admin.tracker.view("env-id") is not None


async def test_register_command_exits_1_when_the_id_is_rejected(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused id exits 1 with the API's code and message on stderr."""
    code = await asyncio.to_thread(register.main, ["x" * 300, "--url", admin.url])
    assert code == 1
    assert "too_long" in capsys.readouterr().err
    assert admin.rejected == [RejectReason.TOO_LONG]


async def test_register_command_exits_3_when_the_exporter_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: a few quick retries, then exit 3."""
    monkeypatch.setattr(register, "RETRY_DELAYS", (0.01, 0.01))
    url = f"http://127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(register.main, ["lost", "--url", url]) == 3
    assert "cannot reach" in capsys.readouterr().err


class RetryDelays:
    """RETRY_DELAYS as register iterates it, from a generator that can signal each retry."""

    def __init__(self, delays: Callable[[], Iterator[float]]) -> None:
        self._delays = delays

    def __iter__(self) -> Iterator[float]:
        return self._delays()


async def test_register_command_waits_for_an_exporter_that_is_still_starting(
    start_admin: AdminFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection refused is retried, so a sidecar that starts late still gets the id."""
    refused = threading.Event()

    def delays() -> Iterator[float]:
        for _ in range(50):
            refused.set()  # a retry is being taken: an attempt was refused
            yield 0.1

    monkeypatch.setattr(register, "RETRY_DELAYS", RetryDelays(delays))
    port = free_port()
    command = asyncio.create_task(
        asyncio.to_thread(register.main, ["late", "--url", f"http://127.0.0.1:{port}"])
    )
    assert await asyncio.to_thread(refused.wait, 10)
    admin = await start_admin(port=port)
    assert await command == 0
    assert admin.tracker.view("late") is not None


async def test_register_command_sends_the_token_from_its_token_file(
    start_admin: AdminFactory, tmp_path: Path
) -> None:
    """--token-file authenticates; without it the command exits 1 (401)."""
    token_file = tmp_path / "admin-token"
    write_token(token_file, "cli-token")
    admin = await start_admin(token_file=str(token_file))
    assert await asyncio.to_thread(register.main, ["no-token", "--url", admin.url]) == 1
    argv = ["with-token", "--url", admin.url, "--token-file", str(token_file)]
    assert await asyncio.to_thread(register.main, argv) == 0
    assert admin.tracker.ids_from(Source.API) == {"with-token"}


def test_register_command_uses_the_admin_api_s_default_url_and_path() -> None:
    """The stdlib-only command's copies of the API's address and path equal the document's."""
    document = openapi_document()
    assert [server["url"] for server in document["servers"]] == [register.DEFAULT_URL]
    assert register.INGESTIONS_PATH in document["paths"]
    operation = document["paths"][register.INGESTIONS_PATH]["post"]
    assert operation["operationId"] == "registerIngestion"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["id", "--label", "no-equals-sign"],
        ["id", "--url", "ftp://127.0.0.1:1"],
        ["id", "--token-file", "/nonexistent/admin-token"],
    ],
)
def test_register_command_exits_2_on_a_usage_error(argv: list[str]) -> None:
    """A bad command line or an unreadable token file exits 2 without sending anything."""
    assert register.main(argv) == 2


# -- the admin listener of a real exporter process ----------------------------------------------


@dataclass(frozen=True)
class Process:
    """A running `python -m exporter`: its admin port and its log file."""

    port: int
    log: Path

    def log_text(self) -> str:
        """Everything the process has logged so far."""
        return self.log.read_text()


@dataclass(frozen=True)
class RawAnswer:
    """An HTTP answer read off a socket: status, lower-cased headers, JSON body or None."""

    status: int
    headers: dict[str, str]
    body: Any


def run_exporter(directory: Path, admin: dict[str, Any]) -> Iterator[Process]:
    """Run the exporter with `admin` as its admin section; stop it (exit 0) when done."""
    port = free_port()
    config = {
        "api": {"base_url": f"http://127.0.0.1:{free_port()}", "auth": {"type": "none"}},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": port, **admin},
        "reload": {"watch_interval_seconds": 0},
    }
    proc, log = launch_exporter(directory, config)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "admin API not up within 30 s"
                time.sleep(0.1)
        yield Process(port, log)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def open_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """An exporter whose admin API has no token and allows the name exporter.internal."""
    yield from run_exporter(
        tmp_path_factory.mktemp("open-admin"), {"allowed_hosts": ["Exporter.Internal."]}
    )


@pytest.fixture(scope="module")
def token_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """An exporter whose admin API needs the token in its token file."""
    directory = tmp_path_factory.mktemp("token-admin")
    write_token(directory / "admin-token", "process-token-1")
    yield from run_exporter(directory, {"token_file": str(directory / "admin-token")})


async def raw_request(
    port: int, method: str, path: str, *, host: bytes, headers: bytes = b"", body: bytes = b""
) -> RawAnswer:
    """Send one request written by hand (any bytes at all), read the answer to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\n" + headers
        if body:
            head += b"Content-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    header_block, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return RawAnswer(
        int(status_line.split()[1]),
        {k.lower(): v for k, v in fields.items()},
        json.loads(payload) if payload else None,
    )


def listed(process: Process) -> list[str]:
    """The ids the process's admin API lists, asked with a loopback Host."""
    with urllib.request.urlopen(f"http://127.0.0.1:{process.port}/api/v1/ingestions") as answer:
        return [view["ingestionId"] for view in json.load(answer)["ingestions"]]


async def test_a_non_utf8_authorization_header_answers_401_without_a_traceback(
    token_exporter: Process,
) -> None:
    """Bytes that are not UTF-8 in the token are a wrong token: 401, a warning, no crash."""
    host = f"127.0.0.1:{token_exporter.port}".encode()
    for value in (b"Bearer \xc3\xa9\xff", b"\xff\xfe \x80", b"Bearer process-token-1\xff"):
        answer = await raw_request(
            token_exporter.port,
            "GET",
            "/api/v1/ingestions",
            host=host,
            headers=b"Authorization: " + value + b"\r\n",
        )
        assert answer.status == 401
        assert answer.body["error"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")
    good = await raw_request(
        token_exporter.port,
        "GET",
        "/api/v1/ingestions",
        host=host,
        headers=b"Authorization: Bearer process-token-1\r\n",
    )
    assert good.status == 200
    text = token_exporter.log_text()
    assert text.count("admin_request_unauthorized") >= 3
    assert "Traceback" not in text and "admin_request_failed" not in text
    assert '"level": "error"' not in text


@pytest.mark.parametrize(
    "host",
    [
        b"rebind.evil.example",
        b"rebind.evil.example:{port}",
        b"localhost.evil.example:{port}",
        b"127.0.0.1.evil.example",
        b"[::2]:{port}",
        b"10.0.0.1:{port}",
        b"::1",
        b"localhost:not-a-port",
        b"\xff\xfe",
        b"",
    ],
)
async def test_a_host_that_is_not_loopback_or_allowed_is_refused_and_changes_nothing(
    open_exporter: Process, host: bytes
) -> None:
    """DNS rebinding: GET, POST and DELETE under a foreign Host answer 421 and change nothing."""
    port = open_exporter.port
    host = host.replace(b"{port}", str(port).encode())
    loopback = f"127.0.0.1:{port}".encode()
    body = json.dumps({"ingestionId": "kept-id"}).encode()
    assert (
        await raw_request(port, "POST", "/api/v1/ingestions", host=loopback, body=body)
    ).status in (200, 201)
    before = listed(open_exporter)
    new = json.dumps({"ingestionId": "rebound-id"}).encode()
    answers = [
        await raw_request(port, "POST", "/api/v1/ingestions", host=host, body=new),
        await raw_request(port, "DELETE", "/api/v1/ingestions/kept-id", host=host),
        await raw_request(port, "GET", "/api/v1/ingestions", host=host),
        await raw_request(port, "GET", "/api/v1/ingestions/kept-id", host=host),
    ]
    for answer in answers:
        assert answer.status == 421
        assert answer.body["error"] == "misdirected_request"
        assert "kept-id" not in json.dumps(answer.body)
    assert listed(open_exporter) == before
    assert "kept-id" in before and "rebound-id" not in before
    assert "admin_request_misdirected" in open_exporter.log_text()


@pytest.mark.parametrize(
    "host",
    [
        b"127.0.0.1:{port}",
        b"127.0.0.1",
        b"127.1.2.3:{port}",
        b"localhost:{port}",
        b"LocalHost.",
        b"[::1]:{port}",
        b"[::1]",
        b"[::ffff:127.0.0.1]:{port}",
        b"exporter.internal:{port}",
        b"EXPORTER.internal",
    ],
)
async def test_a_loopback_or_allowed_host_is_served(open_exporter: Process, host: bytes) -> None:
    """Loopback names and addresses (IPv6 in brackets) and admin.allowed_hosts are served."""
    port = open_exporter.port
    host = host.replace(b"{port}", str(port).encode())
    name = f"served-{host.decode()}"
    created = await raw_request(
        port,
        "POST",
        "/api/v1/ingestions",
        host=host,
        body=json.dumps({"ingestionId": name}).encode(),
    )
    assert created.status == 201
    deleted = await raw_request(
        port, "DELETE", "/api/v1/ingestions/" + quote(name, safe=""), host=host
    )
    assert deleted.status == 204
    assert name not in listed(open_exporter)


# -- admin settings in the config ---------------------------------------------------------------


def admin_config(**admin: Any) -> dict[str, Any]:
    """A minimal config document with `admin` as its admin section."""
    return {
        "api": {"base_url": "http://127.0.0.1:1", "auth": {"type": "none"}},
        "admin": admin,
    }


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "exporter.internal"])  # noqa: S104
def test_a_non_loopback_admin_host_without_a_token_file_is_a_config_error(host: str) -> None:
    """Exposing the admin API beyond loopback needs admin.token_file."""
    with pytest.raises(ConfigError) as error:
        parse_config(admin_config(host=host))
    assert "admin.host" in str(error.value)
    assert "admin.token_file" in str(error.value)


def test_a_non_loopback_admin_host_with_a_token_file_or_disabled_is_accepted(
    tmp_path: Path,
) -> None:
    """With a token, or with the API off, any listen address is fine; loopback needs no token."""
    token_file = tmp_path / "admin-token"
    write_token(token_file, "t")
    config = parse_config(admin_config(host="0.0.0.0", token_file=str(token_file)))  # noqa: S104
    assert config.admin.host == "0.0.0.0"  # noqa: S104
    assert not parse_config(admin_config(host="0.0.0.0", enabled=False)).admin.enabled  # noqa: S104
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert parse_config(admin_config(host=host)).admin.host == host


def test_allowed_hosts_are_read_and_bad_ones_named() -> None:
    """admin.allowed_hosts is a list of host names or addresses without port; default empty."""
    assert parse_config(admin_config()).admin.allowed_hosts == ()
    names = ["exporter.internal", "exporter.internal", "10.0.0.7", "fd00::1"]
    config = parse_config(admin_config(allowed_hosts=names))
    assert config.admin.allowed_hosts == ("exporter.internal", "10.0.0.7", "fd00::1")
    with pytest.raises(ConfigError) as error:
        parse_config(admin_config(allowed_hosts=["ok.example", "host:8080", "http://x", 7]))
    text = str(error.value)
    assert "admin.allowed_hosts[1]" in text and "admin.allowed_hosts[2]" in text
    assert "admin.allowed_hosts[3]" in text and "allowed_hosts[0]" not in text
    with pytest.raises(ConfigError, match=r"admin\.allowed_hosts"):
        parse_config(admin_config(allowed_hosts="exporter.internal"))
