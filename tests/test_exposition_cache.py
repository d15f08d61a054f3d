"""The pre-rendered per-upload series always equal what the store holds, after any change."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.exposition import FAMILIES, UploadExposition
from exporter.models import KNOWN_STATUSES, ErrorKind, PollError, StatusReport
from exporter.uploads import UploadStore
from tests.scrape_body import scrape_body

PER_UPLOAD = {name for name, _ in FAMILIES}
STATUSES = [*KNOWN_STATUSES, "PARTIALLY_DONE"]
IDS = [f"id-{n}" for n in range(12)] + ['quote"back\\slash', "ünï/cødé id"]


def expected_samples(store: UploadStore, names: tuple[str, ...], active_only: bool) -> set:
    """Computed straight from the store, independently of the renderer."""
    samples = set()
    for upload in store:
        extra = tuple((n, upload.labels.get(n, "")) for n in names)
        base = (("ingestion_id", upload.ingestion_id), *extra)
        shown = [upload.status] if active_only else sorted({*KNOWN_STATUSES, upload.status})
        for status in shown:
            value = 1.0 if status == upload.status else 0.0
            labels = frozenset((*base, ("status", status)))
            samples.add(("catalog_upload_status", labels, value))
        samples.add(
            (
                "catalog_upload_status_changed_timestamp_seconds",
                frozenset(base),
                upload.status_changed,
            )
        )
        if upload.last_success is not None:
            samples.add(
                (
                    "catalog_upload_last_success_timestamp_seconds",
                    frozenset(base),
                    upload.last_success,
                )
            )
        samples.add(
            (
                "catalog_upload_report_available",
                frozenset(base),
                1.0 if upload.report_available else 0.0,
            )
        )
    return samples


def rendered_samples(body: bytes, *, openmetrics: bool) -> set:
    parse = parse_om if openmetrics else parse_text
    return {
        (s.name, frozenset(s.labels.items()), s.value)
        for family in parse(body.decode())
        for s in family.samples
        if s.name in PER_UPLOAD
    }


def test_cached_lines_match_the_store_through_random_changes() -> None:
    """Status, labels, report, success, removal, label-set and mode changes all show at once."""
    rng = random.Random(7)
    clock = [1_700_000_000.0]
    store = UploadStore(clock=lambda: clock[0])
    settings = {"names": ("team",), "active": False}
    exposition = UploadExposition(
        store, label_names=lambda: settings["names"], active_status_only=lambda: settings["active"]
    )
    registry = CollectorRegistry()
    for step in range(400):
        clock[0] += rng.uniform(0.1, 5)
        ingestion_id = rng.choice(IDS)
        action = rng.randrange(7)
        if action == 0:
            store.add(ingestion_id, "api", {"team": rng.choice(["a", "b", 'q"'])})
        elif action in (1, 2):
            report = StatusReport(rng.choice(STATUSES), rng.random() < 0.5, "raw")
            store.record_report(ingestion_id, report)
        elif action == 3:
            store.record_error(ingestion_id, PollError(ErrorKind.INVALID_INGESTION_ID))
        elif action == 4:
            store.remove(ingestion_id)
        elif action == 5 and step % 50 == 0:
            settings["names"] = rng.choice([(), ("team",), ("team", "catalog")])
        elif action == 6 and step % 40 == 0:
            settings["active"] = not settings["active"]
        if step % 5 == 0:
            openmetrics = step % 10 == 0
            body = scrape_body(exposition, registry, openmetrics=openmetrics)
            expected = expected_samples(store, settings["names"], settings["active"])
            assert rendered_samples(body, openmetrics=openmetrics) == expected, step


def test_active_only_mode_emits_one_status_series_per_upload() -> None:
    """In active-only mode each upload has exactly one status series, valued 1."""
    store = UploadStore()
    for n in range(5):
        store.add(f"u{n}", "config", {})
    exposition = UploadExposition(store, label_names=lambda: (), active_status_only=lambda: True)
    body = scrape_body(exposition, CollectorRegistry(), openmetrics=False).decode()
    status_lines = [line for line in body.splitlines() if line.startswith("catalog_upload_status{")]
    assert len(status_lines) == 5
    assert all(line.endswith(" 1.0") and 'status="UNKNOWN"' in line for line in status_lines)
