"""A rollout replaces the pod whose sidecar tracked an upload in flight: the new pod starts on
empty volumes (the sidecar's emptyDirs), and only the upload-result queue tells it of the upload.

Real processes throughout: each "pod" is a `python -m exporter` of its own, on a directory and a
state file of its own; the Catalog API is the simulator, on a clock the test moves; the queue is
moto's SQS server on loopback, sent the result as Amazon's SNS topic would send it. The set-up
under test is docs/deploying.md's "Rollouts: uploads in flight" (register_unknown: true).
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SimulatorFactory, value, wait_for
from tests.test_sqs_end_to_end import (
    Process,
    Queue,
    enveloped,
    moto_endpoint,
    polls,
    run_exporter,
)

__all__ = ["moto_endpoint", "run_exporter"]  # the fixtures, shared with test_sqs_end_to_end

pytestmark = pytest.mark.slow

UPLOAD = "amzn1.ingestion.rollout-0001"
#: How long the simulated upload stays INPROGRESS, on the simulator's clock (moved by the test).
IN_FLIGHT_SECONDS = 3600.0
#: The queue's visibility timeout in the test (see below).
VISIBILITY_TIMEOUT_SECONDS = 3
#: Generous: every wait ends on evidence, this only bounds a broken run.
TIMEOUT = 60.0


class Clock:
    """The simulator's clock: still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pod_sections(volumes: Path) -> dict[str, Any]:
    """A sidecar's directory and state on fresh "emptyDirs" under `volumes` (the component's
    layout, on loopback)."""
    ingestions = volumes / "ingestions"
    state = volumes / "state"
    ingestions.mkdir(parents=True)
    state.mkdir()
    return {
        "ingestions": {
            "ids": [],
            "directory": str(ingestions),
            "directory_poll_seconds": 0.2,
            "labels": ["team"],
        },
        "state": {"path": str(state / "state.db")},
    }


def amazon_result(ingestion_id: str, status: str) -> str:
    """An upload result as the Merchant Portal's SNS topic delivers it to the queue: an SNS
    envelope whose Message names the upload (the exporter reads only the id from it)."""
    return enveloped(
        {
            "notificationType": "CATALOG_UPLOAD_RESULT",
            "payload": {"ingestionId": ingestion_id, "processingStatus": status},
        }
    )


def status_is(pod: Process, status: str) -> Any:
    """A `wait_for` condition: the upload's one-hot status on `pod` is `status`."""

    async def condition() -> bool:
        return await pod.status_of(UPLOAD) == status

    return condition


async def tracked(pod: Process) -> float:
    return value(await pod.scrape(), "catalog_exporter_tracked_ingestions") or 0.0


@pytest.mark.parametrize("result_sent", ["after_pod_b_started", "while_no_pod_ran"])
async def test_an_upload_in_flight_when_its_pod_is_replaced_turns_fatal_on_the_new_pod(
    start_simulator: SimulatorFactory,
    moto_endpoint: str,
    run_exporter: Any,
    tmp_path: Path,
    result_sent: str,
) -> None:
    """Pod A's sidecar tracks an INPROGRESS upload (a file its app dropped) and is stopped by
    SIGTERM; pod B's starts on empty volumes, pod C's too but without the queue. The upload then
    turns FATAL and its result lands in the queue, after pod B started or while no pod ran (the
    queue keeps it): pod B shows the upload FATAL, with no human action, and pod C never tracks
    it. Pod B's series lacks the label the app gave the file in pod A (docs/deploying.md)."""
    clock = Clock()
    sim, api_url = await start_simulator(clock=clock)
    sim.add_upload(UPLOAD, [("INPROGRESS", IN_FLIGHT_SECONDS), ("FATAL", 0)])
    queue = Queue(moto_endpoint, f"catalog-upload-results-{result_sent.replace('_', '-')}")
    # A stopped exporter's last long poll may still be open at the queue and take a message
    # sent then; the queue hands it out again after its visibility timeout (30 s by default,
    # which the second case met in every run). Shortened, so the test waits less for it.
    queue.client.set_queue_attributes(
        QueueUrl=queue.url, Attributes={"VisibilityTimeout": str(VISIBILITY_TIMEOUT_SECONDS)}
    )
    sqs = {"queue_url": queue.url, "endpoint_url": moto_endpoint, "register_unknown": True}

    # Pod A: its app drops the upload's file; its sidecar polls it once (interval 600 s).
    pod_a_sections = pod_sections(tmp_path / "pod-a")
    pod_a = await run_exporter(api_url, [], sqs, **pod_a_sections)
    upload_file = Path(pod_a_sections["ingestions"]["directory"]) / "upload-1.json"
    upload_file.write_text(json.dumps({"ingestionId": UPLOAD, "labels": {"team": "pricing"}}))
    await wait_for(status_is(pod_a, "INPROGRESS"), timeout=TIMEOUT)
    samples = await pod_a.scrape()
    assert value(
        samples, "catalog_upload_status", ingestion_id=UPLOAD, status="INPROGRESS", team="pricing"
    )

    # The rollout: pod A is stopped (SIGTERM, as the kubelet does) and its volumes go with it.
    pod_a.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(pod_a.proc.wait, TIMEOUT) == 0
    polls_by_pod_a = sim.count(ingestion_id=UPLOAD)

    async def turn_fatal() -> None:
        clock.now = IN_FLIGHT_SECONDS  # the simulator now answers FATAL
        await asyncio.to_thread(queue.send, amazon_result(UPLOAD, "FATAL"))

    if result_sent == "while_no_pod_ran":
        await turn_fatal()

    # Pod B (with the queue) and pod C (without) start on empty volumes: neither knows of it.
    pod_b = await run_exporter(api_url, [], sqs, **pod_sections(tmp_path / "pod-b"))
    pod_c = await run_exporter(api_url, [], {"queue_url": ""}, **pod_sections(tmp_path / "pod-c"))
    assert await tracked(pod_c) == 0
    if result_sent == "after_pod_b_started":
        assert await tracked(pod_b) == 0
        assert await pod_b.status_of(UPLOAD) is None
        await turn_fatal()

    # Pod B learns of the upload from the queue alone, polls it and shows it FATAL.
    await wait_for(status_is(pod_b, "FATAL"), timeout=TIMEOUT)
    samples = await pod_b.scrape()
    assert value(samples, "catalog_exporter_notifications_total", outcome="registered") == 1
    assert value(samples, "catalog_upload_status", ingestion_id=UPLOAD, status="FATAL", team=""), (
        "the message names no label: the series carries none of those pod A's app gave"
    )
    await wait_for(polls(sim, UPLOAD, polls_by_pod_a + 1), timeout=TIMEOUT)

    async def deleted() -> bool:
        return await asyncio.to_thread(queue.remaining) == 0

    await wait_for(deleted, timeout=TIMEOUT)
    registered = [e for e in pod_b.logs() if e["event"] == "ingestion_registered"]
    assert [(e["ingestion_id"], e["source"]) for e in registered] == [(UPLOAD, "notification")]

    # Pod C, without the queue, tracks nothing: nothing will ever poll the upload there.
    assert await tracked(pod_c) == 0
    assert await pod_c.status_of(UPLOAD) is None
    assert sim.count(ingestion_id=UPLOAD) == polls_by_pod_a + 1
