"""The /metrics body: per-upload series kept rendered as bytes, joined at scrape time.

With 100,000 tracked uploads the obvious way (a labelled Gauge, or a collector building
metric objects on every scrape) takes seconds per scrape. Here, as in kube-state-metrics,
each upload's exposition lines are rendered into bytes when the upload changes (the store
calls `render_upload`), not when it is scraped: a poll that only refreshes the last-success
time re-renders one line. The lines live only in blocks of a few hundred consecutive
uploads, one bytes object per block and family, into which changes are spliced: a scrape
hands out a few thousand pieces (`chunks`) instead of 400,000 lines, and
`gzip_chunks_off_loop` reuses each block's compressed bytes while the block is unchanged. The
handful of other metrics (counters, histograms, aggregates) come from the prometheus_client
registry.

The per-upload families are gauges, whose sample lines are written the same way in the
Prometheus text format and in OpenMetrics; only the framing differs (OpenMetrics ends with
`# EOF`). Output is checked by `promtool check metrics` and both parsers of prometheus_client
in the test suite.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
#: zlib level of the precompressed gzip body: the fastest. A gzip scrape deflates the blocks
#: that changed since the last one; compressing every block of a 100,000-upload body took 108
#: ms at level 1 against 284 ms at level 6, for 6% more bytes (BENCHMARKS.md section 7).
GZIP_LEVEL = 1
_FAMILY_COUNT = len(FAMILIES)
_STATUS, _CHANGED, _SUCCESS, _REPORT = range(_FAMILY_COUNT)
#: No name, no mtime, XFL 4 (fastest algorithm), OS unknown.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
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

    def __init__(self, owner: _Generation) -> None:
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


#: The settings a generation of blocks is rendered with: extra label names, active-only.
_Settings = tuple[tuple[str, ...], bool]


class _Generation:
    """Blocks of every upload's lines, all rendered with the same settings.

    Each block is in `dirty` (at most once; `marked` holds their id()) from its first change
    to the next `refresh`.
    """

    __slots__ = ("blocks", "dirty", "marked", "settings")

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.blocks: list[_Block] = []
        self.dirty: list[_Block] = []
        self.marked: set[int] = set()

    def place(self, upload: TrackedUpload) -> _Block:
        """Give `upload` a position at the end of the last block (a new one if it is full)."""
        blocks = self.blocks
        if not blocks or len(blocks[-1].order) >= BLOCK_SIZE:
            blocks.append(_Block(self))
        block = blocks[-1]
        block.add(upload)
        return block

    def mark(self, block: _Block) -> None:
        """`block` changed: refresh it before the next scrape."""
        if id(block) not in self.marked:
            self.marked.add(id(block))
            self.dirty.append(block)

    def refresh(self) -> None:
        """Bring every changed block up to date; drop empty blocks, merge sparse neighbours."""
        if not self.dirty:
            return
        for block in self.dirty:
            block.refresh()
        self.dirty = []
        self.marked = set()
        compacted: list[_Block] = []
        for block in self.blocks:
            if not block.order:
                continue
            last = compacted[-1] if compacted else None
            if last is not None and len(last.order) + len(block.order) <= BLOCK_SIZE // 2:
                last.absorb(block)
            else:
                compacted.append(block)
        self.blocks = compacted


#: Uploads rendered per slice of a rebuild: 7 us each on a quiet core, up to 20 us beside
#: the state writer and the watcher's threads (the GIL), so a slice is 1-3 ms. A request
#: needs several turns of the loop, each of which may wait for one slice: 1,024 per slice
#: made /healthz wait 100-250 ms during a rebuild of 100,000 uploads. Compressing a block
#: costs about as much as rendering BLOCK_SIZE uploads; one block per slice at most.
REBUILD_SLICE = 128


async def _next_turn() -> None:
    await asyncio.sleep(0)


class UploadExposition:
    """Keeps every upload's exposition lines rendered and joins them for a scrape.

    `label_names` gives the allow-listed extra labels and `active_status_only` whether to emit
    only the status series whose value is 1 (one series per upload instead of seven).

    The lines live in blocks of consecutive uploads (`_Block`), in the store's order: new
    uploads join the last block. A poll re-renders the lines of its upload that changed (only
    the last-success line, usually); the next scrape rebuilds just the blocks and families
    that changed and hands out the blocks' bytes (`chunks`), never joined into one copy.

    When the settings change (a reload), every line must be rendered again: 0.7 s at 100,000
    uploads, too long for the event loop or a scrape. `check_settings` (called on reload and
    by every scrape) starts a new generation of blocks; `run` renders it in slices of
    REBUILD_SLICE uploads, yielding to the loop between slices, and precompresses it; then it
    replaces the served one at once. Until then scrapes get the previous body as it was when
    the rebuild started (frozen: its uploads are being moved to the new generation), and no
    scrape ever renders everything.
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
        self._live = _Generation((label_names(), active_status_only()))
        self._next: _Generation | None = None  # being rebuilt, while the live one is served
        self._todo: list[TrackedUpload] = []  # the uploads the rebuild is to place, in order
        self._placed = 0  # how many of _todo the rebuild has gone through
        self._compressed = 0  # how many of the new generation's blocks are refreshed and gzipped
        self._wake = asyncio.Event()
        #: Rebuilds completed (the new generation swapped in); a scrape never adds one.
        self.rebuilds = 0
        store.set_renderer(self.render_upload, self.forget_upload)

    def render_upload(self, upload: TrackedUpload, full: bool) -> None:
        """Render what changed: every line, or only the last-success line."""
        block = upload.r_block
        live, new = self._live, self._next
        owner = block.owner if isinstance(block, _Block) else None
        if owner is live and new is not None:
            return  # frozen: the rebuild renders the upload as it is when it gets there
        if owner is None or (owner is not live and owner is not new):
            generation = live if new is None else new
            block = generation.place(upload)
            full = True
        else:
            generation = owner
        assert isinstance(block, _Block)
        names, active_only = generation.settings
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
        generation.mark(block)

    def forget_upload(self, upload: TrackedUpload) -> None:
        """The upload is no longer tracked: its lines leave with the next scrape."""
        block = upload.r_block
        if not isinstance(block, _Block):
            return
        generation = self._live if self._next is None else self._next
        if block.owner is not generation:
            return  # not ours, or frozen (the rebuild skips uploads no longer tracked)
        block.remove(upload)
        if len(block.removed) >= _EAGER:
            block.refresh()  # without scrapes, removed uploads must not pile up in the block
        generation.mark(block)

    def check_settings(self) -> bool:
        """Start a rebuild if the settings differ from those of the body being served (or
        being rebuilt); True while a rebuild is under way. Costs O(1) plus a list copy."""
        settings = (self._label_names(), self._active_only())
        target = self._live if self._next is None else self._next
        if settings != target.settings:
            if self._next is None:
                self._live.refresh()  # the served body gets what changed until now
            self._next = _Generation(settings)
            self._todo = list(self._store.uploads())
            self._placed = self._compressed = 0
            self._wake.set()
        return self._next is not None

    def rebuild_step(self, budget: int = REBUILD_SLICE) -> bool:
        """Do about `budget` uploads' worth of the rebuild under way, if any; True once there
        is none left (the new generation is the one served)."""
        new = self._next
        if new is None:
            return True
        todo, store = self._todo, self._store
        if self._placed < len(todo):
            end = min(self._placed + budget, len(todo))
            for index in range(self._placed, end):
                upload = todo[index]
                block = upload.r_block
                if isinstance(block, _Block) and block.owner is new:
                    continue  # added (or re-added) since the rebuild started
                if store.get(upload.ingestion_id) is not upload:
                    continue  # no longer tracked
                upload.r_block = None
                self.render_upload(upload, True)
            self._placed = end
            return False
        blocks = new.blocks
        if self._compressed < len(blocks):
            end = min(self._compressed + max(1, budget // BLOCK_SIZE), len(blocks))
            for block in blocks[self._compressed : end]:
                block.refresh()
                for family in range(_FAMILY_COUNT):
                    block.gzip(family)
            self._compressed = end
            return False
        new.refresh()
        self._live, self._next, self._todo = new, None, []
        self.rebuilds += 1
        return True

    async def run(self, pause: Callable[[], Awaitable[None]] = _next_turn) -> None:
        """Carry out each rebuild as it is started, awaiting `pause()` (by default: let the
        loop run what is ready) between slices. Runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self.rebuild_step():
                await pause()

    def chunks(self, registry: CollectorRegistry, *, openmetrics: bool) -> list[bytes]:
        """The /metrics body in pieces, to be sent in this order: the registry's metrics,
        then the per-upload families, each under its HELP and TYPE lines. During a rebuild
        they are those of the previous settings (see the class)."""
        if not self.check_settings():
            self._live.refresh()
        blocks = self._live.blocks
        if openmetrics:
            head = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            head = head.removesuffix(_EOF)
        else:
            head = generate_latest(registry)
        pieces = [head]
        for family, (name, _) in enumerate(FAMILIES):
            pieces.append(_HEADERS[name])
            pieces.extend(block.chunks[family] for block in blocks)
        if openmetrics:
            pieces.append(_EOF)
        return pieces

    async def gzip_chunks_off_loop(
        self, registry: CollectorRegistry, *, openmetrics: bool
    ) -> list[bytes]:
        """The body of `chunks`, gzip-encoded (one gzip member) in pieces.

        Each block's family is compressed once, when first asked for after it changed, as
        raw deflate ending with a sync flush; those pieces concatenate into one deflate
        stream. Only the CRC of the whole body is computed per scrape (zlib.crc32, C speed).
        The compressing and the CRC are done in a worker thread (zlib lets go of the GIL):
        after a start or a mass change every block needs compressing, 0.3 s at 100,000
        uploads that the event loop must not spend. The body is the one of the moment this
        is called, whatever changes meanwhile."""
        job = self._gzip_job(openmetrics, self.chunks(registry, openmetrics=openmetrics))
        pieces, deflated = await asyncio.to_thread(_compress, job)
        _keep(job.todo, deflated)
        return pieces

    async def precompress(self) -> None:
        """Compress, in a worker thread, every block not compressed yet, as the first gzip
        scrape would (after a start, all of them: seconds at 100,000 uploads under the
        sidecar's CPU limit). Blocks that change meanwhile are left to the next scrape."""
        todo: list[_Deflation] = [
            (0, block, family, block.chunks[family])
            for block in self._live.blocks
            for family in range(_FAMILY_COUNT)
            if block.gzipped[family] is None
        ]
        deflated = await asyncio.to_thread(lambda: [_deflate(data) for *_, data in todo])
        _keep(todo, deflated)

    def _gzip_job(self, openmetrics: bool, plain: list[bytes]) -> _GzipJob:
        parts: list[bytes | None] = [_GZIP_HEADER, None]
        todo: list[_Deflation] = [(1, None, 0, plain[0])]
        blocks = self._live.blocks
        for family, (name, _) in enumerate(FAMILIES):
            parts.append(_GZIPPED_HEADERS[name])
            for block in blocks:
                done = block.gzipped[family]
                if done is None:
                    todo.append((len(parts), block, family, block.chunks[family]))
                parts.append(done)
        if openmetrics:
            parts.append(_GZIPPED_EOF)
        return _GzipJob(plain, parts, todo)


#: A piece to deflate: its position among a gzip body's pieces, the block and family it is
#: (None, 0: the registry's own metrics), and its plain bytes.
_Deflation = tuple[int, _Block | None, int, bytes]


@dataclass(frozen=True, slots=True)
class _GzipJob:
    """A gzip body to finish: the plain pieces (for its CRC and size), the gzip pieces with
    None where `todo` (position, block, family, plain bytes) says what to deflate."""

    plain: list[bytes]
    parts: list[bytes | None]
    todo: list[_Deflation]


def _compress(job: _GzipJob) -> tuple[list[bytes], list[bytes]]:
    """The gzip pieces and the newly deflated ones (in `todo` order). Reads only bytes the
    job holds, so it may run in any thread."""
    deflated = [_deflate(data) for _, _, _, data in job.todo]
    parts = list(job.parts)
    for (position, _, _, _), data in zip(job.todo, deflated, strict=True):
        parts[position] = data
    crc, size = _crc32(job.plain)
    pieces = [part for part in parts if part is not None]
    pieces.append(_DEFLATE_END + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return pieces, deflated


def _keep(todo: list[_Deflation], deflated: list[bytes]) -> None:
    """Cache each block's new deflate, unless the block changed since `todo` was made."""
    for (_, block, family, data), done in zip(todo, deflated, strict=True):
        if block is not None and block.chunks[family] is data and block.gzipped[family] is None:
            block.gzipped[family] = done


#: The CRC is computed over the body in joined runs of about this many bytes.
_CRC_RUN_BYTES = 1 << 20


def _crc32(pieces: list[bytes]) -> tuple[int, int]:
    """The CRC-32 and size of the concatenated pieces.

    A crc32 call per piece (thousands per scrape, each letting go of the GIL and then waiting
    to get it back from the event loop) slowed scrapes and the loop alike; one call over the
    joined body would copy all of it (75 MB at 100,000 uploads). Runs of ~1 MiB do neither.
    """
    crc = size = pending = 0
    run: list[bytes] = []
    for piece in pieces:
        run.append(piece)
        pending += len(piece)
        if pending >= _CRC_RUN_BYTES:
            crc = zlib.crc32(b"".join(run), crc)
            size += pending
            run.clear()
            pending = 0
    if run:
        crc = zlib.crc32(b"".join(run), crc)
        size += pending
    return crc, size


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
    if active_only:
        # Escaped: a status read back from an edited state file may hold any text.
        return _bytes(f'{STATUS}{{{own},status="{escape_label_value(current)}"{extra}}} 1.0\n')
    lines = [
        f'{STATUS}{{{own},status="{status}"{extra}}} {"1.0" if status == current else "0.0"}\n'
        for status in KNOWN_STATUSES
    ]
    if current not in KNOWN_STATUSES:
        lines.append(f'{STATUS}{{{own},status="{escape_label_value(current)}"{extra}}} 1.0\n')
    return _bytes("".join(lines))
