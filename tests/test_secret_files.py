"""Secret files swapped for hostile ones: a FIFO, a huge file, a directory (issue 20, 1-2).

The reader (`exporter.secretfile`) is checked on its own, then through `BearerAuth`, the
`register` command and a real `python -m exporter` whose token files are swapped while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exporter.auth import TOKEN_RECHECK_SECONDS, AuthUnavailable, BearerAuth
from exporter.models import AuthProblem
from exporter.secretfile import MAX_SECRET_BYTES, SecretFile, SecretFileProblem, SecretProblem
from tests.conftest import free_port, free_port_pair, launch_exporter, parse_exposition, value

ADMIN_TOKEN = "admin-token-1"
API_TOKEN = "api-token-1"
#: Larger than the bound, and large enough that reading it on every call shows in rchar.
HUGE = 8 * 1024 * 1024


def swap_in(path: Path, make: Callable[[Path], object]) -> None:
    """Replace `path` atomically by what `make` creates next to it (as a secret is rotated)."""
    staged = path.with_name(path.name + ".new")
    make(staged)
    os.replace(staged, path)


def huge_file(path: Path) -> None:
    """A sparse file of HUGE bytes (zeros): no disk used, but every byte is read by read()."""
    with path.open("wb") as file:
        file.truncate(HUGE)


def problem_of(answer: str | SecretFileProblem) -> SecretFileProblem:
    assert isinstance(answer, SecretFileProblem), "expected a problem, got a secret"
    return answer


# -- the reader ---------------------------------------------------------------------------------


def test_a_fifo_is_refused_as_not_a_regular_file_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    """A FIFO with no writer gives a problem naming the path and the kind, at once."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    problem = problem_of(SecretFile(str(fifo)).read())
    assert problem.reason is SecretProblem.NOT_REGULAR
    assert problem.message == f"token file {fifo} is not a regular file (it is a FIFO)"


def test_a_directory_is_refused_as_not_a_regular_file(tmp_path: Path) -> None:
    """A directory mounted where the token should be is named as such."""
    problem = problem_of(SecretFile(str(tmp_path)).read())
    assert problem.reason is SecretProblem.NOT_REGULAR
    assert "a directory" in problem.message


def test_a_file_over_the_bound_is_refused_from_its_size_without_being_read(
    tmp_path: Path,
) -> None:
    """One byte over MAX_SECRET_BYTES is refused, no byte of it read; the bound itself is fine."""
    path = tmp_path / "token"
    path.write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    reader = SecretFile(str(path))
    problem = problem_of(reader.read())
    assert problem.reason is SecretProblem.TOO_LARGE
    assert f"{MAX_SECRET_BYTES + 1} bytes" in problem.message
    assert str(MAX_SECRET_BYTES) in problem.message
    assert reader.reads == 0
    path.write_bytes(b"x" * MAX_SECRET_BYTES)
    assert reader.read() == "x" * MAX_SECRET_BYTES


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", SecretProblem.EMPTY),
        (b" \n\t", SecretProblem.EMPTY),
        (b"\xff\xfe", SecretProblem.NOT_UTF8),
    ],
    ids=repr,
)
def test_an_empty_or_undecodable_file_is_a_problem_naming_the_path(
    tmp_path: Path, content: bytes, reason: SecretProblem
) -> None:
    """Empty (white space only) and non-UTF-8 files are problems of their own reason."""
    path = tmp_path / "token"
    path.write_bytes(content)
    problem = problem_of(SecretFile(str(path)).read())
    assert (problem.reason, problem.path) == (reason, str(path))
    assert str(path) in problem.message


def test_a_missing_file_is_unreadable_and_found_once_it_appears(tmp_path: Path) -> None:
    """A missing file is `unreadable`; the next read after it appears gives its text."""
    path = tmp_path / "token"
    reader = SecretFile(str(path))
    problem = problem_of(reader.read())
    assert problem.reason is SecretProblem.UNREADABLE
    assert "No such file" in problem.message
    path.write_text("late\n")
    assert reader.read() == "late"


def test_an_unchanged_bad_file_is_read_once_and_a_changed_one_again(tmp_path: Path) -> None:
    """A bad file is cached by (device, inode, mtime, size) like a good one: 100 reads of it
    read its content once; a new file at the path (a new inode) is read and picked up."""
    path = tmp_path / "token"
    path.write_text("half\nsecret-half")
    reader = SecretFile(str(path), check=lambda text: "is two lines" if "\n" in text else None)
    for _ in range(100):
        assert problem_of(reader.read()).reason is SecretProblem.INVALID
    assert reader.reads == 1
    swap_in(path, lambda staged: staged.write_text("whole-secret\n"))
    assert reader.read() == "whole-secret"
    assert reader.read() == "whole-secret"
    assert reader.reads == 2


def test_a_file_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    """Same inode, new modification time and size: the new content is read."""
    path = tmp_path / "token"
    path.write_text("first")
    reader = SecretFile(str(path))
    assert reader.read() == "first"
    path.write_text("second-and-longer")
    assert reader.read() == "second-and-longer"
    assert reader.reads == 2


def test_a_symlinked_secret_is_followed(tmp_path: Path) -> None:
    """Kubernetes mounts each Secret key as a symlink: the link is followed, not refused."""
    (tmp_path / "real").write_text("linked-token")
    (tmp_path / "token").symlink_to("real")
    assert SecretFile(str(tmp_path / "token")).read() == "linked-token"


# -- through BearerAuth -------------------------------------------------------------------------


@contextlib.contextmanager
def rescued(fifo: Path, after: float = 30) -> Iterator[None]:
    """Unblock a reader stuck opening `fifo` after `after` s (a writer opens and closes it, so
    the reader sees an empty file) and the test then fails instead of hanging for ever."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(after):
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting after all
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=rescue)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def test_bearer_auth_refuses_a_fifo_token_file_as_unreadable(tmp_path: Path) -> None:
    """A FIFO token file is AuthUnavailable (kind token_unreadable) naming the path, not a hang."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    with rescued(fifo), pytest.raises(AuthUnavailable) as raised:
        await BearerAuth(token_file=str(fifo)).headers("POST", "http://x", b"", {})
    assert raised.value.kind is AuthProblem.TOKEN_UNREADABLE
    assert str(raised.value) == f"token file {fifo} is not a regular file (it is a FIFO)"


async def test_bearer_auth_reads_an_unchanged_bad_file_once_across_recheck_intervals(
    tmp_path: Path,
) -> None:
    """Each recheck interval costs one stat(); the content of an unchanged bad file is read
    once, and a fixed file is picked up at the next check."""
    path = tmp_path / "token"
    path.write_text("bad token")
    now = [100.0]
    auth = BearerAuth(token_file=str(path), clock=lambda: now[0])
    for _ in range(20):
        with pytest.raises(AuthUnavailable) as raised:
            await auth.headers("POST", "http://x", b"", {})
        assert raised.value.kind is AuthProblem.TOKEN_INVALID
        now[0] += TOKEN_RECHECK_SECONDS
    assert auth.token_file is not None and auth.token_file.reads == 1
    swap_in(path, lambda staged: staged.write_text("good-token"))
    now[0] += TOKEN_RECHECK_SECONDS
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer good-token"}
    assert auth.token_file.reads == 2


async def test_bearer_auth_refuses_a_huge_token_file_without_reading_it(tmp_path: Path) -> None:
    """A file over the bound is token_unreadable with its size, and never read."""
    path = tmp_path / "token"
    huge_file(path)
    now = [100.0]
    auth = BearerAuth(token_file=str(path), clock=lambda: now[0])
    for _ in range(5):
        with pytest.raises(AuthUnavailable, match="is too large") as raised:
            await auth.headers("POST", "http://x", b"", {})
        assert raised.value.kind is AuthProblem.TOKEN_UNREADABLE
        now[0] += TOKEN_RECHECK_SECONDS
    assert auth.token_file is not None and auth.token_file.reads == 0


# -- the register command -----------------------------------------------------------------------


def test_register_refuses_a_fifo_token_file_with_exit_2(tmp_path: Path) -> None:
    """`register --token-file FIFO` exits 2 naming the problem instead of waiting for a writer."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "register", "up-1", "--url", url, "--token-file", fifo],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"token file {fifo} is not a regular file (it is a FIFO)" in done.stderr


# -- a real exporter process --------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """A `python -m exporter` whose token files sit in `directory`."""

    pid: int
    port: int
    admin_port: int
    log: Path
    admin_token: Path
    api_token: Path

    def admin(self, token: str = ADMIN_TOKEN) -> tuple[int, dict[str, Any]]:
        """GET the admin API's list with `token`: (status, JSON body). Times out after 10 s."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/api/v1/ingestions",
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def get(self, port: int, path: str) -> tuple[int, bytes]:
        """GET `path` on `port` (the main or the admin listener). Times out after 10 s."""
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()

    def auth_errors(self, kind: str) -> float:
        """catalog_exporter_auth_errors_total{kind}, scraped."""
        _, body = self.get(self.port, "/metrics")
        samples = parse_exposition(body.decode())
        return value(samples, "catalog_exporter_auth_errors_total", kind=kind) or 0

    def bytes_read(self) -> int:
        """Bytes the process has read through read() and the like (/proc/PID/io rchar)."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        msg = "no rchar in /proc/PID/io"
        raise AssertionError(msg)


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait until `condition()` holds (checked every 50 ms); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def exporter_process(directory: Path) -> Iterator[Running]:
    """Run the exporter with bearer token files for the API and the admin API, polling five
    ids against a closed port (auth comes first, so the token file is read for every poll)."""
    admin_token, api_token = directory / "admin-token", directory / "api-token"
    admin_token.write_text(ADMIN_TOKEN + "\n")
    api_token.write_text(API_TOKEN + "\n")
    port = free_port_pair()  # the admin API listens on port + 1
    config = {
        "api": {
            "base_url": f"http://127.0.0.1:{free_port()}",
            "auth": {"type": "bearer", "token_file": str(api_token)},
            "timeout_seconds": 2,
        },
        "polling": {
            "interval_seconds": 0.2,
            "initial_backoff_seconds": 0.05,
            "max_backoff_seconds": 0.2,
        },
        "ingestions": {"ids": [f"up-{n}" for n in range(5)]},
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": port + 1, "token_file": str(admin_token)},
        "reload": {"watch_interval_seconds": 0},
    }
    proc, log = launch_exporter(directory, config)
    running = Running(proc.pid, port, port + 1, log, admin_token, api_token)
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return running.get(running.admin_port, "/healthz")[0] == 200
            except OSError:
                return False

        until(up, "the admin API answers /healthz")
        yield running
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    assert code == 0, f"the exporter did not stop on SIGTERM (exit {code}): {log.read_text()}"
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_fifos_swapped_in_for_both_token_files_leave_the_exporter_answering(
    tmp_path: Path,
) -> None:
    """With both token files replaced by FIFOs, /healthz answers on both listeners, the admin
    API answers 503 auth_unavailable, polls count token_unreadable, the log names the file;
    regular files swapped back are picked up (200 with the new token, 401 with the old)."""
    with exporter_process(tmp_path) as running:
        assert running.admin()[0] == 200
        swap_in(running.admin_token, os.mkfifo)
        swap_in(running.api_token, os.mkfifo)

        def admin_refuses() -> bool:
            status, body = running.admin()
            return status == 503 and body["error"] == "auth_unavailable"

        until(admin_refuses, "the admin API answers 503 for a FIFO token file")
        assert running.get(running.port, "/healthz")[0] == 200
        assert running.get(running.admin_port, "/healthz")[0] == 200
        before = running.auth_errors("token_unreadable")
        until(
            lambda: running.auth_errors("token_unreadable") > before + 2,
            "polls count token_unreadable",
        )
        text = running.log.read_text()
        for token_file in (running.admin_token, running.api_token):
            assert f"token file {token_file} is not a regular file (it is a FIFO)" in text

        swap_in(running.admin_token, lambda staged: staged.write_text("admin-token-2"))
        until(lambda: running.admin("admin-token-2")[0] == 200, "the new admin token works")
        assert running.admin(ADMIN_TOKEN)[0] == 401


@pytest.mark.slow
def test_a_huge_token_file_is_refused_and_never_read(tmp_path: Path) -> None:
    """Token files of 8 MiB are refused (503 from the admin API, token_unreadable for polls)
    and not read: 30 admin requests and dozens of polls read under 1 MiB in all, where reading
    the file each time would be 8 MiB per call."""
    with exporter_process(tmp_path) as running:
        swap_in(running.admin_token, huge_file)
        swap_in(running.api_token, huge_file)
        until(lambda: running.admin()[0] == 503, "the admin API refuses the huge token file")
        polls = running.auth_errors("token_unreadable")
        read_before = running.bytes_read()
        for _ in range(30):
            status, body = running.admin()
            assert (status, body["error"]) == (503, "auth_unavailable")
        until(
            lambda: running.auth_errors("token_unreadable") >= polls + 20,
            "20 more polls refused for the token file",
        )
        assert running.bytes_read() - read_before < 1024 * 1024
        assert running.get(running.port, "/healthz")[0] == 200
        text = running.log.read_text()
        assert f"token file {running.api_token} is too large ({HUGE} bytes" in text
        assert f"token file {running.admin_token} is too large ({HUGE} bytes" in text
