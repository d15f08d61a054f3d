"""Statuses the API invents map to one label value, OTHER: the series stay a fixed set."""

from __future__ import annotations

import json

from exporter.models import EXPOSED_STATUSES
from exporter.scheduler import MAX_UNKNOWN_VALUES_LOGGED
from exporter.simulator import Fault, FaultKind
from exporter.state import StateSnapshot, UploadRecord
from exporter.tracking import IngestionTracker
from exporter.uploads import UploadStore
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    requests_seen,
    value,
    wait_for,
)

UPLOADS = 5
NEW_STATUSES_EACH = 30  # 150 distinct values, past MAX_UNKNOWN_VALUES_LOGGED


async def test_an_api_answering_a_new_status_on_every_poll_adds_no_series(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """150 polls answering 150 well-formed new statuses (INPROGRESS_0, ...): every `status`
    label value stays one of the eight exposed, each answer is counted, and the log names at
    most MAX_UNKNOWN_VALUES_LOGGED values, then says once that later ones are only counted."""
    assert UPLOADS * NEW_STATUSES_EACH > MAX_UNKNOWN_VALUES_LOGGED
    sim, url = await start_simulator()
    ids = [f"inventive-{n}" for n in range(UPLOADS)]
    for n, ingestion_id in enumerate(ids):
        sim.add_upload(ingestion_id, [("INPROGRESS", 0)])
        for k in range(NEW_STATUSES_EACH):  # each taken by one poll, in order
            body = json.dumps({"processingStatus": f"INPROGRESS_{n * NEW_STATUSES_EACH + k}"})
            sim.inject(
                Fault(FaultKind.WRONG_SHAPE, body=body, label="new_status"),
                ingestion_id=ingestion_id,
                count=1,
            )
    config = fast_config(url, ids, polling={"interval_seconds": 0.02})
    running = await start_exporter(config)
    for ingestion_id in ids:
        # Polls of one upload are sequential: its next request means the last one was applied.
        await wait_for(requests_seen(sim, ingestion_id, NEW_STATUSES_EACH + 1))
        await wait_for(running.status_is(ingestion_id, "INPROGRESS"))
    assert sum(r.fault == "new_status" for r in sim.requests) == UPLOADS * NEW_STATUSES_EACH

    samples = await running.scrape()
    labelled = {dict(labels)["status"] for (_, labels) in samples if "status" in dict(labels)}
    assert labelled <= set(EXPOSED_STATUSES)
    assert len(labelled) == len(EXPOSED_STATUSES)  # the aggregates list each, OTHER too
    counted = value(samples, "catalog_exporter_unknown_statuses_total", exposed_as="OTHER")
    assert counted == UPLOADS * NEW_STATUSES_EACH
    assert {u.status for u in running.exporter.store} == {"INPROGRESS"}
    events = [json.loads(line) for line in running.logs.getvalue().splitlines()]
    named = [e["value"] for e in events if e["event"] == "unknown_status_value"]
    assert len(named) == len(set(named)) == MAX_UNKNOWN_VALUES_LOGGED
    assert all(e["exposed_as"] == "OTHER" for e in events if e["event"] == "unknown_status_value")
    assert sum(e["event"] == "unknown_status_values_not_logged" for e in events) == 1


def test_a_state_record_with_a_status_outside_the_set_is_restored_as_other_and_rewritten() -> None:
    """A state file from before OTHER kept each invented value: restored as OTHER (or
    UNKNOWN for a non-identifier), and the rows marked to be written back."""
    store = UploadStore()
    tracker = IngestionTracker(
        store,
        max_tracked=10,
        label_names=(),
        on_added=lambda ids: None,
        on_removed=lambda ids: None,
        on_rejected=lambda reason: None,
    )
    marked: list[str] = []

    class State:
        def mark(self, ingestion_ids: list[str]) -> None:
            marked.extend(ingestion_ids)

    tracker.attach_state(State())  # type: ignore[arg-type]
    records = [
        UploadRecord("a", ("api",), {}, "INPROGRESS_42", 1.0, 1.0, last_success=1.0),
        UploadRecord("b", ("api",), {}, "in progress (50%)", 1.0, 1.0, last_success=1.0),
        UploadRecord("c", ("api",), {}, "DONE", 1.0, 1.0, last_success=1.0),
    ]
    tracker.restore(StateSnapshot(tuple(records), {}))
    assert {u.ingestion_id: u.status for u in store} == {
        "a": "OTHER",
        "b": "UNKNOWN",
        "c": "DONE",
    }
    assert sorted(marked) == ["a", "b"]
    assert store.status_counts()["INPROGRESS_42"] == 0
