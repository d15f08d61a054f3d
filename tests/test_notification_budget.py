"""What notifications may register: their own cap below ingestions.max_tracked, and a short
stay for the ids the API calls INVALID, so forged messages cannot lock the other sources out
or be polled forever (issue 20, finding 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config
from exporter.models import RejectReason, Status
from exporter.notifications import Named, NotificationHandler
from exporter.scheduler import Trigger
from exporter.service import Exporter
from exporter.tracking import Source
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, value, wait_for

API = {"base_url": "https://api.example.com", "auth": {"type": "none"}}


def forging(exporter: Exporter) -> NotificationHandler:
    """The exporter's own handler, as `_start_notifications` builds it, without a queue."""
    return NotificationHandler(
        trigger=lambda ingestion_id, polled: Trigger.NOT_TRACKED,
        tracker=exporter.tracker,
        metrics=exporter.notification_metrics,
        register_unknown=True,
    )


async def send_forged(handler: NotificationHandler, messages: int, tag: str) -> None:
    """`messages` messages naming 100 made-up ids each (the most one message may name)."""
    for m in range(messages):
        ids = tuple(f"forged-{tag}-{m}-{n}" for n in range(100))
        await handler.handle(Named(ids, enveloped=False), received_at=0.0)


async def test_forged_notifications_fill_only_their_own_cap_and_admin_ids_still_fit(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """100 messages of 100 forged ids each: notifications hold a tenth of max_tracked at most
    (notification_cap_reached past it), and the other 90% still takes admin registrations,
    after a restart too."""
    _, url = await start_simulator()
    config = fast_config(
        url,
        [],
        ingestions={"max_tracked": 200},
        state={"path": str(tmp_path / "state.db"), "debounce_seconds": 0},
        notifications={"sqs": {"register_unknown": True}},
    )
    first = await start_exporter(config)
    await send_forged(forging(first.exporter), 100, "a")
    assert first.exporter.tracker.ids_from(Source.NOTIFICATION) == {
        f"forged-a-0-{n}" for n in range(20)
    }
    refused = value(
        await first.scrape(),
        "catalog_exporter_rejected_ingestions_total",
        reason=RejectReason.NOTIFICATION_CAP.value,
    )
    assert refused == 100 * 100 - 20
    await first.stop()  # stops the exporter; the state keeps the 20

    again = await start_exporter(config)
    exporter = again.exporter
    assert len(exporter.tracker.ids_from(Source.NOTIFICATION)) == 20
    await send_forged(forging(exporter), 5, "b")
    assert len(exporter.tracker.ids_from(Source.NOTIFICATION)) == 20
    answers = [
        await exporter.tracker.register(f"real-{n}", Source.API, durable=True) for n in range(180)
    ]
    assert all(a.accepted and a.created for a in answers)


async def test_an_invalid_id_only_a_notification_named_is_released_after_its_retention(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """The API calls a notification's id INVALID: it goes after invalid_retention_seconds,
    logged, instead of being polled every invalid_retry_seconds forever; an INVALID id an
    admin registered, or that the config lists, stays."""
    _, url = await start_simulator()  # it knows no upload: every id is invalid
    config = fast_config(
        url,
        ["typo-in-config"],
        notifications={"sqs": {"register_unknown": True, "invalid_retention_seconds": 0.5}},
    )
    running = await start_exporter(config)
    tracker = running.exporter.tracker
    await tracker.register("typo-from-admin", Source.API)
    await forging(running.exporter).handle(Named(("forged",), enveloped=False), 0.0)
    assert tracker.view("forged") is not None

    async def released() -> bool:
        return tracker.view("forged") is None

    await wait_for(released, timeout=10)
    for kept in ("typo-in-config", "typo-from-admin"):
        view = tracker.view(kept)
        assert view is not None and view.status == Status.INVALID.value
    removed = [
        json.loads(line)
        for line in running.logs.getvalue().splitlines()
        if '"ingestion_removed"' in line
    ]
    assert [(r["ingestion_id"], r.get("reason")) for r in removed] == [
        ("forged", "invalid_retention")
    ]


def test_max_registered_must_leave_room_below_max_tracked() -> None:
    """notifications.sqs.max_registered at or above ingestions.max_tracked is a config error."""
    document = {
        "api": API,
        "ingestions": {"max_tracked": 50},
        "notifications": {"sqs": {"max_registered": 50}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    assert "notifications.sqs.max_registered" in str(caught.value)
    assert "below ingestions.max_tracked (50)" in str(caught.value)
    document["notifications"] = {"sqs": {"max_registered": 49}}
    sqs = parse_config(document, environ={}).notifications.sqs
    assert sqs.registration_cap(50) == 49
    assert parse_config({"api": API}, environ={}).notifications.sqs.registration_cap(100_000) == (
        10_000
    )
