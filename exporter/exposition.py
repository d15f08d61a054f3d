"""The /metrics body: per-upload series kept rendered as bytes, joined at scrape time.

With 100,000 tracked uploads the obvious way (a labelled Gauge, or a collector building
metric objects on every scrape) takes seconds per scrape. Here, as in kube-state-metrics,
each upload's exposition lines are rendered into bytes when the upload changes (the store
calls `render_upload`), not when it is scraped: a poll that only refreshes the last-success
time re-renders one line. A scrape then only joins bytes, at C speed. The handful of other
metrics (counters, histograms, aggregates) come from the prometheus_client registry.

The per-upload families are gauges, whose sample lines are written the same way in the
Prometheus text format and in OpenMetrics; only the framing differs (OpenMetrics ends with
`# EOF`). Output is checked by `promtool check metrics` and both parsers of prometheus_client
in the test suite.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from exporter.models import KNOWN_STATUSES
from exporter.uploads import TrackedUpload, UploadStore

STATUS = "catalog_upload_status"
CHANGED = "catalog_upload_status_changed_timestamp_seconds"
LAST_SUCCESS = "catalog_upload_last_success_timestamp_seconds"
REPORT = "catalog_upload_report_available"

#: (name, help) of the per-upload families, in exposition order. Help texts contain no
#: backslash, newline or quote, so they need no escaping in either format.
FAMILIES: tuple[tuple[str, str], ...] = (
    (STATUS, "Upload status, one-hot: 1 for the status the API last reported, else 0."),
    (CHANGED, "When the exporter first saw the upload's current status."),
    (LAST_SUCCESS, "When a poll of this upload last succeeded (absent until one does)."),
    (REPORT, "1 when the API returned a non-empty reportDownloadLink for the upload."),
)

_HEADERS = {
    name: f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
    for name, help_text in FAMILIES
}
_EOF = b"# EOF\n"


def escape_label_value(value: str) -> str:
    """Backslash, newline and double quote escaped, as both formats require."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class UploadExposition:
    """Keeps every upload's exposition lines rendered and joins them for a scrape.

    `label_names` gives the allow-listed extra labels and `active_status_only` whether to emit
    only the status series whose value is 1 (one series per upload instead of seven). Both
    may change on reload: the next scrape notices and renders every upload again.
    """

    def __init__(
        self,
        store: UploadStore,
        label_names: Callable[[], tuple[str, ...]],
        active_status_only: Callable[[], bool],
    ) -> None:
        self._store = store
        self._label_names = label_names
        self._active_only = active_status_only
        self._settings = (label_names(), active_status_only())
        store.set_renderer(self.render_upload)

    def render_upload(self, upload: TrackedUpload, full: bool) -> None:
        """Render what changed: every line, or only the last-success line."""
        names, active_only = self._settings
        own, extra = _labels(upload, names)
        if full:
            upload.r_status = _status_lines(upload, own, extra, active_only)
            upload.r_changed = _line(CHANGED, own, extra, _float(upload.status_changed))
            upload.r_report = _line(REPORT, own, extra, "1.0" if upload.report_available else "0.0")
        if upload.last_success is not None:
            upload.r_success = _line(LAST_SUCCESS, own, extra, _float(upload.last_success))

    def render(self, registry: CollectorRegistry, *, openmetrics: bool) -> bytes:
        """The whole /metrics body: the registry's metrics, then the per-upload families."""
        settings = (self._label_names(), self._active_only())
        if settings != self._settings:
            self._settings = settings
            for upload in self._store.uploads():
                self.render_upload(upload, True)
        if openmetrics:
            head = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            head = head.removesuffix(_EOF)
        else:
            head = generate_latest(registry)
        uploads = self._store.uploads()
        return b"".join(
            [
                head,
                _HEADERS[STATUS],
                *map(_R_STATUS, uploads),
                _HEADERS[CHANGED],
                *map(_R_CHANGED, uploads),
                _HEADERS[LAST_SUCCESS],
                *map(_R_SUCCESS, uploads),
                _HEADERS[REPORT],
                *map(_R_REPORT, uploads),
                _EOF if openmetrics else b"",
            ]
        )


_R_STATUS = attrgetter("r_status")
_R_CHANGED = attrgetter("r_changed")
_R_SUCCESS = attrgetter("r_success")
_R_REPORT = attrgetter("r_report")


def _float(value: float) -> str:
    """A sample value written as prometheus_client writes it (Go's formatting)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _bytes(text: str) -> bytes:
    # Ids and labels are validated on the way in; "replace" keeps one bad value (say, from an
    # old state file) from failing every scrape.
    return text.encode("utf-8", "replace")


def _labels(upload: TrackedUpload, names: tuple[str, ...]) -> tuple[str, str]:
    """(ingestion_id label, extra labels) rendered, the extra ones with a leading comma."""
    own = f'ingestion_id="{escape_label_value(upload.ingestion_id)}"'
    extra = "".join(
        f',{name}="{escape_label_value(upload.labels.get(name, ""))}"' for name in names
    )
    return own, extra


def _line(name: str, own: str, extra: str, value: str) -> bytes:
    return _bytes(f"{name}{{{own}{extra}}} {value}\n")


def _status_lines(upload: TrackedUpload, own: str, extra: str, active_only: bool) -> bytes:
    current = upload.status
    statuses = (current,) if active_only else KNOWN_STATUSES
    lines = [
        f'{STATUS}{{{own},status="{status}"{extra}}} {"1.0" if status == current else "0.0"}\n'
        for status in statuses
    ]
    if not active_only and current not in KNOWN_STATUSES:
        lines.append(f'{STATUS}{{{own},status="{escape_label_value(current)}"{extra}}} 1.0\n')
    return _bytes("".join(lines))
