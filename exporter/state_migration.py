"""Release 1's JSON state file: read once, without trusting it, into the SQLite store.

Release 1 saved the tracked uploads as one JSON document (through `.<name>.<random>.tmp`
files). `state.open_store` hands a file at the state path that is not a database to
`read_release_1`: a document of the wrong shape is refused whole (`NotRelease1`: the store
moves it aside like a corrupt file), an entry that fails its checks is skipped and counted,
the rest is kept. Writing the database and the order of the renames that make the migration
crash-safe are the store's; this module knows the old format and the names of its files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from exporter.models import ingestion_id_problem
from exporter.responses import describe_error

__all__ = [
    "BACKUP_SUFFIX",
    "JSON_VERSION",
    "NotRelease1",
    "Release1State",
    "Release1Upload",
    "keep_backup",
    "read_release_1",
    "remove_temp_files",
]

JSON_VERSION = 1  #: the version field of release 1's JSON state file
BACKUP_SUFFIX = ".v1.json"  #: the JSON is kept beside the new database under this suffix
_TEMP_SUFFIX = ".tmp"  # release 1 saved through `.<name>.<random>.tmp` files


class NotRelease1(ValueError):
    """The file is not release 1's JSON state (not JSON, or the wrong shape)."""


class Release1Upload(TypedDict):
    """One upload entry that passed its checks: the fields of `state.UploadRecord`."""

    ingestion_id: str
    sources: tuple[str, ...]
    labels: dict[str, str]
    status: str
    first_seen: float
    status_changed: float
    last_success: float | None
    terminal_at: float | None
    report_available: bool
    queue_observed: bool
    released: bool


@dataclass(frozen=True, slots=True)
class Release1State:
    """What a release-1 file holds, and how many entries were skipped (why the first was)."""

    uploads: tuple[Release1Upload, ...]
    retired: Mapping[str, float]
    skipped: int = 0
    first_skipped: str = ""


class _Invalid(ValueError):
    """An entry, or the document, does not have the expected shape."""


def read_release_1(raw: bytes) -> Release1State:
    """The uploads and retired ids in a release-1 file's bytes; NotRelease1 if it is not one."""
    try:
        # RecursionError: deeply nested arrays in a hostile file exhaust the parser's stack.
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise NotRelease1(f"state file is not valid JSON: {describe_error(exc)}") from None
    try:
        return _parse_document(document)
    except _Invalid as exc:
        raise NotRelease1(f"state file has the wrong shape: {exc}") from None


def keep_backup(path: Path) -> Path:
    """Keep the JSON at `path` as `<path>.v1.json` (a hard link: no copy of 30 MB; a rename
    where there are no hard links) before the new database takes the path."""
    backup = Path(f"{path}{BACKUP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(backup)
    try:
        os.link(path, backup)
    except OSError:
        os.replace(path, backup)
    return backup


def remove_temp_files(path: Path) -> None:
    """The temporary files of a release-1 save that was interrupted: never the state itself."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _parse_document(document: object) -> Release1State:
    """The entries in `document` that pass their checks, how many did not, and why the first."""
    if not isinstance(document, dict):
        raise _Invalid(f"expected an object at the top level, got {_type_name(document)}")
    version = document.get("version")
    if type(version) is not int or version != JSON_VERSION:
        shown = version if type(version) is int else _type_name(version)
        raise _Invalid(f"expected version {JSON_VERSION}, got {shown}")
    _number(document, "written_at", "")
    uploads_raw = document.get("uploads")
    if not isinstance(uploads_raw, list):
        raise _Invalid(f"uploads: expected a list, got {_type_name(uploads_raw)}")
    retired_raw = document.get("retired")
    if not isinstance(retired_raw, dict):
        raise _Invalid(f"retired: expected an object, got {_type_name(retired_raw)}")

    reasons: list[str] = []
    uploads: dict[str, Release1Upload] = {}
    for index, item in enumerate(uploads_raw):
        where = f"uploads[{index}]."
        try:
            upload = _parse_upload(item, where)
        except _Invalid as exc:
            reasons.append(str(exc))
            continue
        if ingestion_id_problem(upload["ingestion_id"]) is not None:
            reasons.append(f"{where}ingestion_id: not a valid ingestionId")
        elif upload["ingestion_id"] in uploads:
            reasons.append(f"{where}ingestion_id: a duplicate")
        else:
            uploads[upload["ingestion_id"]] = upload

    retired: dict[str, float] = {}
    for key in retired_raw:
        try:
            when = _number(retired_raw, key, "retired.")
        except _Invalid:
            # Not the message: it would quote the key, which is untrusted text.
            reasons.append("retired: an entry's time is not a finite number")
            continue
        if ingestion_id_problem(key) is not None:
            reasons.append("retired: not a valid ingestionId")
            continue
        retired[key] = when
    first = reasons[0] if reasons else ""
    return Release1State(tuple(uploads.values()), retired, len(reasons), first)


def _parse_upload(item: object, where: str) -> Release1Upload:
    if not isinstance(item, dict):
        raise _Invalid(f"{where[:-1]}: expected an object, got {_type_name(item)}")
    sources = item.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise _Invalid(f"{where}sources: expected a list of strings")
    labels = item.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise _Invalid(f"{where}labels: expected an object of strings")
    return Release1Upload(
        ingestion_id=_string(item, "ingestion_id", where),
        sources=tuple(sources),
        labels=dict(labels),
        status=_string(item, "status", where),
        first_seen=_number(item, "first_seen", where),
        status_changed=_number(item, "status_changed", where),
        last_success=_optional_number(item, "last_success", where),
        terminal_at=_optional_number(item, "terminal_at", where),
        report_available=_flag(item, "report_available", where),
        queue_observed=_flag(item, "queue_observed", where),
        released=_flag(item, "released", where),
    )


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Invalid(f"{where}{key}: expected a string, got {_type_name(value)}")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    # bool is an int subclass, but `true` is never a timestamp.
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if math.isfinite(number):
            return number
        raise _Invalid(f"{where}{key}: expected a finite number")
    raise _Invalid(f"{where}{key}: expected a number, got {_type_name(value)}")


def _optional_number(obj: dict[str, Any], key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _number(obj, key, where)


def _flag(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _Invalid(f"{where}{key}: expected true or false, got {_type_name(value)}")
    return value
