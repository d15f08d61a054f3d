"""The /metrics body: per-upload series kept rendered as bytes, joined at scrape time.

With 100,000 tracked uploads the obvious way (a labelled Gauge, or a collector building
metric objects on every scrape) takes seconds per scrape. Here, as in kube-state-metrics,
each upload's exposition lines are rendered into bytes when the upload changes (the store
calls `render_upload`), not when it is scraped: a poll that only refreshes the last-success
time re-renders one line. The lines live only in blocks of a few hundred consecutive
uploads, one bytes object per block and family, into which changes are spliced: a scrape
hands out a few thousand pieces (`chunks`; `render` joins them) instead of 400,000 lines,
and `gzip_chunks` reuses each block's compressed bytes while the block is unchanged. The
handful of other metrics (counters, histograms, aggregates) come from the prometheus_client
registry.

The per-upload families are gauges, whose sample lines are written the same way in the
Prometheus text format and in OpenMetrics; only the framing differs (OpenMetrics ends with
`# EOF`). Output is checked by `promtool check metrics` and both parsers of prometheus_client
in the test suite.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Callable
from itertools import accumulate

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


#: Uploads per block. A block's lines of one family are one bytes object: a scrape joins a
#: few hundred of them instead of 100,000s of per-upload lines, and a change rebuilds only
#: its block. Blocks left sparse by removals are merged with their neighbour.
BLOCK_SIZE = 256
#: A block with this many uploads' new lines waiting is refreshed at once, not at the scrape.
_EAGER = BLOCK_SIZE // 4
#: zlib level of the precompressed gzip body (aiohttp's own compression uses the default, 6).
GZIP_LEVEL = 6
_FAMILY_COUNT = len(FAMILIES)
_STATUS, _CHANGED, _SUCCESS, _REPORT = range(_FAMILY_COUNT)
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, no mtime, OS unknown
_DEFLATE_END = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush()


class _Block:
    """Up to BLOCK_SIZE uploads, consecutive in exposition order, and their rendered lines.

    Uploads keep their position in `order` (`upload.r_index`) until the next `refresh`.
    `chunks[f]` holds the lines of family f of the first `len(lengths[f])` positions, each
    `lengths[f][i]` bytes long: the only copy of them. Positions after those were added
    since. A change renders the upload's new lines into `pending[f]` (by position); an
    upload that leaves adds its position to `removed`. `refresh` splices it all in.
    """

    __slots__ = ("built", "chunks", "gzipped", "lengths", "order", "owner", "pending", "removed")

    def __init__(self, owner: UploadExposition) -> None:
        self.owner = owner
        self.order: list[TrackedUpload] = []
        self.built = 0  # positions in the chunks
        self.removed: set[int] = set()
        self.chunks: list[bytes] = [b""] * _FAMILY_COUNT
        self.lengths: list[array[int]] = [array("I") for _ in range(_FAMILY_COUNT)]
        self.pending: list[dict[int, bytes]] = [{} for _ in range(_FAMILY_COUNT)]
        self.gzipped: list[bytes | None] = [None] * _FAMILY_COUNT

    def __len__(self) -> int:
        return len(self.order) - len(self.removed)

    def add(self, upload: TrackedUpload) -> None:
        """`upload` joins at the end (its lines follow in `pending`)."""
        upload.r_block = self
        upload.r_index = len(self.order)
        self.order.append(upload)

    def remove(self, upload: TrackedUpload) -> None:
        """`upload` leaves; its lines go with the next refresh."""
        position = upload.r_index
        self.removed.add(position)
        for pending in self.pending:
            pending.pop(position, None)
        upload.r_block = None

    def refresh(self) -> None:
        """Splice the pending lines, the removals and the additions into the chunks."""
        built, removed = self.built, self.removed
        reshaped = bool(removed) or len(self.order) != built
        if not reshaped and not any(self.pending):
            return
        dropped = [position for position in removed if position < built]
        new = [position for position in range(built, len(self.order)) if position not in removed]
        for family, pending in enumerate(self.pending):
            if not pending and not reshaped:
                continue
            changes: dict[int, bytes | None] = dict.fromkeys(dropped)
            for position, line in pending.items():
                if position < built:
                    changes[position] = line
            appended = [pending.get(position, b"") for position in new]
            self.chunks[family], self.lengths[family] = _splice(
                self.chunks[family], self.lengths[family], changes, appended
            )
            pending.clear()
            self.gzipped[family] = None
        if reshaped:
            first = min(removed, default=built)
            order = self.order
            for position in sorted(removed, reverse=True):
                del order[position]
            for position in range(first, len(order)):
                order[position].r_index = position
            removed.clear()
            self.built = len(order)

    def absorb(self, other: _Block) -> None:
        """Append `other`'s uploads (both refreshed, `other` next in order) to this block."""
        for upload in other.order:
            upload.r_block = self
            upload.r_index += self.built
        self.order += other.order
        self.built = len(self.order)
        for family in range(_FAMILY_COUNT):
            self.chunks[family] += other.chunks[family]
            self.lengths[family] += other.lengths[family]
            self.gzipped[family] = None

    def gzip(self, family: int) -> bytes:
        """The family's chunk as raw deflate ending on a byte boundary (a sync flush), so
        that such pieces concatenate into one deflate stream."""
        done = self.gzipped[family]
        if done is None:
            done = self.gzipped[family] = _deflate(self.chunks[family])
        return done


def _splice(
    chunk: bytes, lengths: array[int], changes: dict[int, bytes | None], appended: list[bytes]
) -> tuple[bytes, array[int]]:
    """`chunk` (pieces of `lengths`) with piece i replaced by changes[i] (None: dropped),
    then `appended`; and the new lengths. Unchanged runs are copied as whole slices."""
    offsets = list(accumulate(lengths, initial=0))
    old = memoryview(chunk)
    pieces: list[bytes | memoryview] = []
    new_lengths = array("I", lengths)
    start = 0
    for index in sorted(changes):
        if index > start:
            pieces.append(old[offsets[start] : offsets[index]])
        line = changes[index]
        if line is not None:
            pieces.append(line)
            new_lengths[index] = len(line)
        start = index + 1
    pieces.append(old[offsets[start] :])
    for index in sorted((i for i, line in changes.items() if line is None), reverse=True):
        del new_lengths[index]
    pieces.extend(appended)
    new_lengths.extend(map(len, appended))
    return b"".join(pieces), new_lengths


class UploadExposition:
    """Keeps every upload's exposition lines rendered and joins them for a scrape.

    `label_names` gives the allow-listed extra labels and `active_status_only` whether to emit
    only the status series whose value is 1 (one series per upload instead of seven). Both
    may change on reload: the next scrape notices and renders every upload again.

    The lines live in blocks of consecutive uploads (`_Block`), in the store's order: new
    uploads join the last block. A poll re-renders the lines of its upload that changed (only
    the last-success line, usually); the next scrape rebuilds just the blocks and families
    that changed and hands out the blocks' bytes (`chunks`), joined by `render`.
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
        self._blocks: list[_Block] = []
        self._dirty: list[_Block] = []  # each block at most once (`_mark`)
        self._marked: set[int] = set()  # id() of the blocks in _dirty
        store.set_renderer(self.render_upload, self.forget_upload)

    def render_upload(self, upload: TrackedUpload, full: bool) -> None:
        """Render what changed: every line, or only the last-success line."""
        block = upload.r_block
        if not isinstance(block, _Block) or block.owner is not self:
            block = self._place(upload)
            full = True
        names, active_only = self._settings
        own, extra = _labels(upload, names)
        key = upload.r_index
        pending = block.pending
        if full:
            pending[_STATUS][key] = _status_lines(upload, own, extra, active_only)
            pending[_CHANGED][key] = _line(CHANGED, own, extra, _float(upload.status_changed))
            report = "1.0" if upload.report_available else "0.0"
            pending[_REPORT][key] = _line(REPORT, own, extra, report)
        if upload.last_success is not None:
            pending[_SUCCESS][key] = _line(LAST_SUCCESS, own, extra, _float(upload.last_success))
        if len(pending[_SUCCESS]) >= _EAGER or len(pending[_STATUS]) >= _EAGER:
            block.refresh()  # bounds what waits for a scrape, and spreads the work out
        self._mark(block)

    def forget_upload(self, upload: TrackedUpload) -> None:
        """The upload is no longer tracked: its lines leave with the next scrape."""
        block = upload.r_block
        if not isinstance(block, _Block) or block.owner is not self:
            return
        block.remove(upload)
        if len(block.removed) >= _EAGER:
            block.refresh()  # without scrapes, removed uploads must not pile up in the block
        self._mark(block)

    def _place(self, upload: TrackedUpload) -> _Block:
        blocks = self._blocks
        if not blocks or len(blocks[-1].order) >= BLOCK_SIZE:
            blocks.append(_Block(self))
        block = blocks[-1]
        block.add(upload)
        return block

    def _mark(self, block: _Block) -> None:
        if id(block) not in self._marked:
            self._marked.add(id(block))
            self._dirty.append(block)

    def _refresh(self) -> None:
        """Bring every block up to date; drop empty blocks, merge sparse neighbours."""
        settings = (self._label_names(), self._active_only())
        if settings != self._settings:
            self._settings = settings
            self._blocks = []
            self._dirty = []
            self._marked = set()
            for upload in self._store.uploads():
                upload.r_block = None
                self.render_upload(upload, True)
        if not self._dirty:
            return
        for block in self._dirty:
            block.refresh()
        self._dirty = []
        self._marked = set()
        self._compact()

    def _compact(self) -> None:
        compacted: list[_Block] = []
        for block in self._blocks:
            if not block.order:
                continue
            last = compacted[-1] if compacted else None
            if last is not None and len(last.order) + len(block.order) <= BLOCK_SIZE // 2:
                last.absorb(block)
            else:
                compacted.append(block)
        self._blocks = compacted

    def chunks(self, registry: CollectorRegistry, *, openmetrics: bool) -> list[bytes]:
        """The /metrics body in pieces, to be sent in this order: the registry's metrics,
        then the per-upload families, each under its HELP and TYPE lines."""
        self._refresh()
        if openmetrics:
            head = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            head = head.removesuffix(_EOF)
        else:
            head = generate_latest(registry)
        pieces = [head]
        for family, (name, _) in enumerate(FAMILIES):
            pieces.append(_HEADERS[name])
            pieces.extend(block.chunks[family] for block in self._blocks)
        if openmetrics:
            pieces.append(_EOF)
        return pieces

    def render(self, registry: CollectorRegistry, *, openmetrics: bool) -> bytes:
        """The whole /metrics body: the registry's metrics, then the per-upload families."""
        return b"".join(self.chunks(registry, openmetrics=openmetrics))

    def gzip_chunks(self, registry: CollectorRegistry, *, openmetrics: bool) -> list[bytes]:
        """The body of `chunks`, gzip-encoded (one gzip member) in pieces.

        Each block's family is compressed once, when first asked for after it changed, as
        raw deflate ending with a sync flush; those pieces concatenate into one deflate
        stream. Only the CRC of the whole body is computed per scrape (zlib.crc32, C speed).
        """
        plain = self.chunks(registry, openmetrics=openmetrics)
        crc = 0
        for piece in plain:
            crc = zlib.crc32(piece, crc)
        size = sum(map(len, plain))
        pieces = [_GZIP_HEADER, _deflate(plain[0])]
        for family, (name, _) in enumerate(FAMILIES):
            pieces.append(_GZIPPED_HEADERS[name])
            pieces.extend(block.gzip(family) for block in self._blocks)
        if openmetrics:
            pieces.append(_GZIPPED_EOF)
        pieces.append(_DEFLATE_END + struct.pack("<II", crc, size & 0xFFFFFFFF))
        return pieces


def _deflate(data: bytes) -> bytes:
    """`data` as raw deflate, flushed to a byte boundary and not final (b"" for b"")."""
    if not data:
        return b""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


_GZIPPED_HEADERS = {name: _deflate(header) for name, header in _HEADERS.items()}
_GZIPPED_EOF = _deflate(_EOF)


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
