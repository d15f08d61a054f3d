"""Secret files (bearer tokens): small regular files, read without blocking, cached by identity.

A token file is named by the config, but what sits at that path is up to whoever mounts it,
at any time: a FIFO, a device, a directory or a file of a gigabyte. `open().read()` would
block for ever on a FIFO with no writer and read a huge file whole, again on every call when
its content is unusable. `SecretFile` is the one reader of every secret file (the API's
bearer token, the admin token, the `register` command's token):

- it stat()s the path and opens it only when that says regular file, then with
  O_RDONLY | O_NONBLOCK | O_CLOEXEC, and checks fstat() of what it opened again (the path may
  have been swapped meanwhile): an open never waits for a FIFO's writer;
- it refuses a file over `MAX_SECRET_BYTES` from its size, before reading, and reads at most
  one byte past the bound (a file growing after fstat() is refused too);
- it caches what it found, the secret or the problem alike, by the file's identity
  (device, inode, modification time in ns, size): an unchanged file, good or bad, costs one
  stat() per call. Only a failed open() or read() is not cached (a chmod or a passing I/O
  error changes none of the four): that costs an open(), still never a read.

Symlinks are followed on purpose (no O_NOFOLLOW): a Kubernetes Secret volume mounts each key
as a symlink into a `..data` directory that is re-pointed on rotation.

Every call does blocking I/O (a stat() on a stuck network mount can hang), so code on the
event loop runs `read` in a thread (`auth.BearerAuth` does, at most once per recheck interval).
Problems are values, never exceptions, and name the path and the reason, never the content.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_SECRET_BYTES",
    "FileVersion",
    "SecretFile",
    "SecretFileProblem",
    "SecretProblem",
    "file_version",
]

#: The largest secret file read (bytes). A bearer token is tens to a few thousand bytes (a JWT
#: with many claims stays under 8 KiB); a larger file is a mistake or an attack, refused from
#: its size without being read, so no more than this is ever held in memory for a secret.
MAX_SECRET_BYTES = 64 * 1024

#: What the reader opens with: never waits (a FIFO with no writer), never leaks into children.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

#: A file's identity and version: (st_dev, st_ino, st_mtime_ns, st_size). A Kubernetes
#: Secret's atomic swap of its `..data` link changes the inode.
FileVersion = tuple[int, int, int, int]


class SecretProblem(enum.StrEnum):
    """Why a secret file gave no secret."""

    UNREADABLE = "unreadable"  # missing, permission denied, an I/O error
    NOT_REGULAR = "not_a_regular_file"  # a FIFO, a socket, a device, a directory
    TOO_LARGE = "too_large"  # over MAX_SECRET_BYTES
    NOT_UTF8 = "not_utf8"
    EMPTY = "empty"  # nothing but white space
    INVALID = "invalid"  # refused by the caller's check (e.g. white space inside a token)


@dataclass(frozen=True, slots=True)
class SecretFileProblem:
    """A secret file that gave no secret: its path, the reason, and a message for people that
    names the path and never quotes the content."""

    path: str
    reason: SecretProblem
    message: str


#: A check of the text read: a problem's wording ("contains white space...") or None.
SecretCheck = Callable[[str], str | None]


class SecretFile:
    """One secret file at a fixed path: `read()` gives its stripped text or a problem.

    `noun` names the file in messages ("token file"). `check` refuses a text for a reason of
    the caller's (its answer is cached with the file like the other problems). `limit` is
    the size bound, `MAX_SECRET_BYTES` unless a test wants a smaller one.
    """

    def __init__(
        self,
        path: str,
        *,
        noun: str = "token file",
        check: SecretCheck | None = None,
        limit: int = MAX_SECRET_BYTES,
    ) -> None:
        if not path:
            msg = "SecretFile needs a path"
            raise ValueError(msg)
        self._path = path
        self._noun = noun
        self._check = check
        self._limit = limit
        self._cached: tuple[FileVersion, str | SecretFileProblem] | None = None
        self._reads = 0

    @property
    def path(self) -> str:
        """The path read (symlinks followed)."""
        return self._path

    @property
    def reads(self) -> int:
        """How many times content was read from the file (not counting cached answers)."""
        return self._reads

    def read(self) -> str | SecretFileProblem:
        """The file's text, stripped, or why there is none. Blocking: call it in a thread
        from the event loop. An unchanged file (same key) is answered from the cache."""
        try:
            info = os.stat(self._path)
        except (OSError, ValueError) as exc:
            return self._unreadable(exc)
        key = file_version(info)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        if stat.S_ISREG(info.st_mode):
            loaded, result = self._load()
        else:
            loaded, result = key, self._not_regular(info.st_mode)
        if loaded is not None:
            self._cached = (loaded, result)
        return result

    def _load(self) -> tuple[FileVersion | None, str | SecretFileProblem]:
        """Open, check again what was opened, read at most one byte past the bound. The key
        is None when the open or the read failed: permissions or an I/O error may change
        without changing the key, so that is not cached."""
        try:
            fd = os.open(self._path, _OPEN_FLAGS)
        except (OSError, ValueError) as exc:
            return None, self._unreadable(exc)
        try:
            info = os.fstat(fd)
            key = file_version(info)
            if not stat.S_ISREG(info.st_mode):
                return key, self._not_regular(info.st_mode)
            if info.st_size > self._limit:
                return key, self._too_large(info.st_size)
            self._reads += 1
            raw = _read_at_most(fd, self._limit + 1)
        except OSError as exc:
            return None, self._unreadable(exc)
        finally:
            os.close(fd)
        if len(raw) > self._limit:
            return key, self._too_large(len(raw))
        return key, self._text(raw)

    def _text(self, raw: bytes) -> str | SecretFileProblem:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._problem(SecretProblem.NOT_UTF8, "is not valid UTF-8")
        if not text:
            return self._problem(SecretProblem.EMPTY, "is empty")
        wrong = self._check(text) if self._check is not None else None
        return text if wrong is None else self._problem(SecretProblem.INVALID, wrong)

    def _unreadable(self, exc: OSError | ValueError) -> SecretFileProblem:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return self._problem(SecretProblem.UNREADABLE, f"cannot be read: {reason}")

    def _not_regular(self, mode: int) -> SecretFileProblem:
        return self._problem(
            SecretProblem.NOT_REGULAR, f"is not a regular file (it is {_kind(mode)})"
        )

    def _too_large(self, size: int) -> SecretFileProblem:
        return self._problem(
            SecretProblem.TOO_LARGE,
            f"is too large ({size} bytes; a secret file holds at most {self._limit})",
        )

    def _problem(self, reason: SecretProblem, wording: str) -> SecretFileProblem:
        return SecretFileProblem(self._path, reason, f"{self._noun} {self._path} {wording}")


def file_version(info: os.stat_result) -> FileVersion:
    """What tells a replaced or rewritten file from the one read before (`FileVersion`)."""
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd` (fewer at the end of the file)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")
