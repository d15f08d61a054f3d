"""The hand-written per-upload renderer against prometheus_client as an oracle.

The same families are built with `GaugeMetricFamily` in a fresh registry and written by
prometheus_client's own `generate_latest` (text and OpenMetrics); both outputs are parsed and
compared family by family, sample by sample, label by label, value by value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.exposition import CHANGED, FAMILIES, LAST_SUCCESS, REPORT, STATUS, UploadExposition
from exporter.models import KNOWN_STATUSES, StatusReport
from exporter.uploads import UploadStore
from tests.scrape_body import scrape_body

#: Ids and label values that need escaping or are not ASCII, beside plain ones.
AWKWARD = [
    "plain-id",
    'quote"inside',
    "back\\slash",
    "trailing\\",
    "new\nline",
    'all\\three"\n',
    "ünïcødé/ид/标识",
    "emoji-🚀",
    "{braces},=commas",
]
LABELS = ("team", "catalog")


class Oracle:
    """The per-upload families as prometheus_client would build them, from the store alone."""

    def __init__(self, store: UploadStore, label_names: tuple[str, ...], active_only: bool):
        self._store = store
        self._names = label_names
        self._active_only = active_only

    def collect(self) -> Iterator[Metric]:
        help_of = dict(FAMILIES)
        own = ["ingestion_id", *self._names]
        status = GaugeMetricFamily(STATUS, help_of[STATUS], labels=[own[0], "status", *own[1:]])
        changed = GaugeMetricFamily(CHANGED, help_of[CHANGED], labels=own)
        success = GaugeMetricFamily(LAST_SUCCESS, help_of[LAST_SUCCESS], labels=own)
        report = GaugeMetricFamily(REPORT, help_of[REPORT], labels=own)
        for upload in self._store:
            values = [upload.ingestion_id, *(upload.labels.get(n, "") for n in self._names)]
            shown: Iterable[str] = (
                (upload.status,)
                if self._active_only
                else [*KNOWN_STATUSES, *([upload.status] * (upload.status not in KNOWN_STATUSES))]
            )
            for value in shown:
                status.add_metric(
                    [values[0], value, *values[1:]], 1.0 if value == upload.status else 0.0
                )
            changed.add_metric(values, upload.status_changed)
            if upload.last_success is not None:
                success.add_metric(values, upload.last_success)
            report.add_metric(values, 1.0 if upload.report_available else 0.0)
        yield from (status, changed, success, report)


def families(body: bytes, *, openmetrics: bool) -> list[tuple[str, str, str, list[tuple]]]:
    """(name, type, help, samples) of every family, samples as (name, labels, value)."""
    parse = parse_om if openmetrics else parse_text
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(s.name, sorted(s.labels.items()), s.value) for s in family.samples],
        )
        for family in parse(body.decode("utf-8"))
    ]


def both(
    store: UploadStore, label_names: tuple[str, ...], *, active_only: bool, openmetrics: bool
) -> tuple[bytes, bytes]:
    """(ours, the oracle's) for the same store and settings."""
    ours = scrape_body(
        UploadExposition(
            store, label_names=lambda: label_names, active_status_only=lambda: active_only
        ),
        CollectorRegistry(),
        openmetrics=openmetrics,
    )
    registry = CollectorRegistry()
    registry.register(Oracle(store, label_names, active_only))  # type: ignore[arg-type]
    theirs = generate_openmetrics(registry) if openmetrics else generate_latest(registry)
    return ours, theirs


def awkward_store() -> UploadStore:
    """Uploads in every shape: each status, unknown ones, reports, successes, awkward labels."""
    clock = [1_700_000_000.0]
    store = UploadStore(clock=lambda: clock[0])
    statuses = [*KNOWN_STATUSES, "PARTIALLY_DONE", 'ODD"VALUE\\\n']
    for n, awkward in enumerate(AWKWARD * 2):
        ingestion_id = f"{awkward}-{n}" if n >= len(AWKWARD) else awkward
        labels = {"team": AWKWARD[(n + 3) % len(AWKWARD)]} if n % 3 else {}
        store.add(ingestion_id, "config", labels)
        clock[0] += 0.125 + n / 7
        if n % 4 != 3:  # some never succeed: no last-success series
            status = statuses[n % len(statuses)]
            store.record_report(ingestion_id, StatusReport(status, n % 2 == 0, status))
    return store


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
@pytest.mark.parametrize("active_only", [False, True], ids=["all-statuses", "active-only"])
@pytest.mark.parametrize("label_names", [(), LABELS], ids=["no-labels", "extra-labels"])
def test_the_renderer_agrees_with_prometheus_client(
    openmetrics: bool, active_only: bool, label_names: tuple[str, ...]
) -> None:
    """Families, types, help, samples, labels (escaped ones too) and values equal the oracle's."""
    store = awkward_store()
    ours, theirs = both(store, label_names, active_only=active_only, openmetrics=openmetrics)
    expected = families(theirs, openmetrics=openmetrics)
    assert [f[0] for f in expected] == [name for name, _ in FAMILIES]
    assert sum(len(f[3]) for f in expected) >= 3 * len(store)  # the oracle is not empty
    assert families(ours, openmetrics=openmetrics) == expected


def test_an_empty_store_agrees_with_prometheus_client() -> None:
    """With no uploads, both write the four families' headers and no samples."""
    for openmetrics in (False, True):
        ours, theirs = both(UploadStore(), (), active_only=False, openmetrics=openmetrics)
        assert families(ours, openmetrics=openmetrics) == families(theirs, openmetrics=openmetrics)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=8, unique=True),
    team=st.text(max_size=12),
    status=st.sampled_from([*KNOWN_STATUSES, "PARTIALLY_DONE"]),
)
def test_any_ids_and_label_values_render_as_prometheus_client_renders_them(
    ids: list[str], team: str, status: str
) -> None:
    """Whatever text an id or label holds, the parsed output equals the oracle's."""
    store = UploadStore(clock=lambda: 1_700_000_000.5)
    for ingestion_id in ids:
        store.add(ingestion_id, "config", {"team": team})
        store.record_report(ingestion_id, StatusReport(status, True, status))
    for openmetrics in (False, True):
        ours, theirs = both(store, ("team",), active_only=False, openmetrics=openmetrics)
        assert families(ours, openmetrics=openmetrics) == families(theirs, openmetrics=openmetrics)
