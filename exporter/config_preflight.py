"""The config's pre-flight: what a valid document still needs from the filesystem and the
environment, checked after `config_models` accepted it.

It checks that a token file (api.auth, admin) is a readable regular file within the size
bound of `secretfile`, that a token variable is set, that an existing ingestions.directory
is a directory, that the directory of state.path exists and that state.path (or a file kept
beside it) is not the config file, a token file or inside ingestions.directory, symlinks and
hard links seen through. It fills in what the document leaves to the surroundings: the
sigv4 and SQS regions from AWS_REGION / AWS_DEFAULT_REGION, and a null sharding.index from
the hostname's ordinal (HOSTNAME, else the system's). It never reads, keeps or prints a
token, and no message echoes a value that might be one. It creates nothing: a missing
ingestions.directory or state file is left for the app.

Each problem names its key path, as the models' do: `config.parse_config` words and sorts
them together. A section the models refused is checked on the keys it reads (`READS`) when
those alone are valid, so one run still reports what it can.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.config_models import (
    REGION,
    AdminConfig,
    ApiConfig,
    IngestionsConfig,
    NotificationsConfig,
    ShardingConfig,
    StateConfig,
    is_within,
)
from exporter.config_wording import describe
from exporter.secretfile import MAX_SECRET_BYTES
from exporter.sharding import index_from_hostname

__all__ = ["READS", "Finding", "Preflight", "Surroundings", "preflight"]

#: The keys the pre-flight of each section reads, by section. A section the models refused
#: is still pre-flighted when these keys alone (the others at their defaults) are valid: a
#: missing token file is reported beside a bad port, as the models report every bad key.
READS: dict[str, tuple[tuple[str, ...], ...]] = {
    "api": (("base_url",), ("auth",)),
    "ingestions": (("directory",),),
    "admin": (("enabled",), ("token_file",)),
    "state": (("path",),),
    "sharding": (("total",), ("index",)),
    "notifications": (("sqs", "queue_url"), ("sqs", "region")),
}

_REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Only a conventional upper-case name is echoed: a mixed-case value may be a token pasted
# into the wrong key.
_ECHOABLE_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
#: The files SQLite and the state module keep beside the state database, by suffix.
_STATE_COMPANIONS = ("-wal", "-shm", "-journal", ".migrating", ".reopening", ".v1.json")


@dataclass(frozen=True, slots=True)
class Surroundings:
    """What the pre-flight may look at besides the config: the environment, the hostname
    (asked only to resolve a null sharding.index) and the file the config was read from.
    With `token_files_may_be_absent` (`--on-invalid-config=serve`), a token file that does
    not exist yet is no problem: the token is read at request time, and a Secret may be
    mounted after the pod started."""

    environ: Mapping[str, str]
    hostname: Callable[[], str]
    config_path: str = ""
    token_files_may_be_absent: bool = False

    @classmethod
    def of(
        cls,
        environ: Mapping[str, str] | None = None,
        hostname: str | None = None,
        config_path: str | os.PathLike[str] = "",
        *,
        token_files_may_be_absent: bool = False,
    ) -> Surroundings:
        """The process' own, unless given: HOSTNAME (Kubernetes sets it to the pod name),
        else socket.gethostname()."""
        env = os.environ if environ is None else environ

        def resolve_hostname() -> str:
            if hostname is not None:
                return hostname
            return env.get("HOSTNAME") or socket.gethostname()

        return cls(env, resolve_hostname, os.fspath(config_path), token_files_may_be_absent)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem at a key path; `value` is what the key holds, for `config_wording` to
    tell whether the message could be quoting a secret. `{here}` in `message` stands for
    the key path of the key's section."""

    loc: tuple[str, ...]
    message: str
    value: object = None


@dataclass(slots=True)
class Preflight:
    """What the pre-flight found: the sections it filled in (by name) and its problems."""

    resolved: dict[str, Any] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)


def preflight(sections: Mapping[str, Any], surroundings: Surroundings) -> Preflight:
    """Check the valid sections of a document (by name) against their surroundings."""
    found = Preflight()
    api, admin = sections.get("api"), sections.get("admin")
    ingestions = sections.get("ingestions")
    if isinstance(api, ApiConfig):
        _check_api(api, surroundings, found)
    if isinstance(ingestions, IngestionsConfig) and ingestions.directory:
        # Missing is fine: an emptyDir or a mount may only appear once the app starts.
        problem = _kind_problem(ingestions.directory, directory=True, required=False)
        if problem:
            found.problems.append(Finding(("ingestions", "directory"), problem))
    if isinstance(admin, AdminConfig) and admin.enabled and admin.token_file:
        problem = _token_file_problem(admin.token_file, surroundings.token_files_may_be_absent)
        if problem:
            found.problems.append(Finding(("admin", "token_file"), problem, admin.token_file))
    state = sections.get("state")
    if isinstance(state, StateConfig) and state.path:
        problem = _kind_problem(
            os.path.dirname(state.path), directory=True, required=True
        ) or _named_file_problem(state.path, surroundings, sections)
        if problem:
            found.problems.append(Finding(("state", "path"), problem, state.path))
    sharding = sections.get("sharding")
    if isinstance(sharding, ShardingConfig):
        _resolve_shard(sharding, surroundings.hostname, found)
    notifications = sections.get("notifications")
    if isinstance(notifications, NotificationsConfig):
        _resolve_sqs_region(notifications, surroundings.environ, found)
    return found


def _check_api(api: ApiConfig, surroundings: Surroundings, found: Preflight) -> None:
    """sigv4's region from the environment when the file has none; bearer's token source."""
    environ = surroundings.environ
    auth = api.auth
    at = ("api", "auth")
    if auth.type == "sigv4" and not auth.region:
        name = next((name for name in _REGION_ENV_VARS if environ.get(name)), None)
        if name is None:
            found.problems.append(
                Finding(
                    (*at, "region"),
                    "required with type: sigv4; set it here or in AWS_REGION or AWS_DEFAULT_REGION",
                )
            )
        elif not REGION.fullmatch(environ[name]):
            found.problems.append(
                Finding(
                    (*at, "region"),
                    "expected an AWS region such as us-east-1, "
                    f"got {describe(environ[name], secret=True)} (from {name})",
                    environ[name],
                )
            )
        else:
            region = environ[name]
            found.resolved["api"] = api.model_copy(
                update={"auth": auth.model_copy(update={"region": region})}
            )
    elif auth.type == "bearer" and auth.token_file:
        problem = _token_file_problem(auth.token_file, surroundings.token_files_may_be_absent)
        if problem:
            found.problems.append(Finding((*at, "token_file"), problem, auth.token_file))
    elif auth.type == "bearer" and auth.token_env and not environ.get(auth.token_env, "").strip():
        name = (
            repr(auth.token_env)
            if _ECHOABLE_ENV_NAME.fullmatch(auth.token_env)
            else "named here (name not shown: is it the token itself?)"
        )
        found.problems.append(
            Finding(
                (*at, "token_env"),
                # No value given to mask: the name is echoed only when it is shaped like one.
                f"environment variable {name} is not set or is empty",
            )
        )


def _resolve_shard(sharding: ShardingConfig, hostname: Callable[[], str], found: Preflight) -> None:
    """A null index with several shards is the hostname's StatefulSet ordinal."""
    if "index" in sharding.model_fields_set or sharding.total == 1:
        return
    name = hostname()
    ordinal = index_from_hostname(name)
    if ordinal is None:
        problem = (
            "set {here}.index or run in a StatefulSet whose pod names end in "
            f"-<ordinal>; hostname {describe(name)} has none"
        )
    elif ordinal >= sharding.total:
        problem = (
            f"hostname {describe(name)} gives ordinal {ordinal}, but {{here}}.total is "
            f"{sharding.total} (ordinals 0 to {sharding.total - 1}): run as many replicas "
            "as {here}.total, or set {here}.index"
        )
    else:
        found.resolved["sharding"] = sharding.model_copy(update={"index": ordinal})
        return
    found.problems.append(Finding(("sharding", "index"), problem))


def _resolve_sqs_region(
    notifications: NotificationsConfig, environ: Mapping[str, str], found: Preflight
) -> None:
    """With a queue whose URL names no region and none in the file: the environment's."""
    sqs = notifications.sqs
    if not sqs.queue_url or sqs.region:
        return
    at = ("notifications", "sqs", "region")
    region = next((environ[name] for name in _REGION_ENV_VARS if environ.get(name)), "")
    if not region:
        found.problems.append(
            Finding(
                at,
                "required when queue_url is not on sqs.<region>.amazonaws.com; set it here or "
                "in AWS_REGION or AWS_DEFAULT_REGION",
            )
        )
    elif not REGION.fullmatch(region):
        found.problems.append(
            Finding(
                at,
                f"expected an AWS region such as us-east-1, got {describe(region, secret=True)}",
                region,
            )
        )
    else:
        found.resolved["notifications"] = notifications.model_copy(
            update={"sqs": sqs.model_copy(update={"region": region})}
        )


def _token_file_problem(path: str, absent_ok: bool = False) -> str | None:
    """Say why the token file cannot be used, or None; the file's content is never read.

    The path is not quoted: the key may hold the token itself, pasted in the wrong place.
    A file that does not exist is fine with `absent_ok`.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None if absent_ok else f"the file named here ({_length(path)}) does not exist"
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a usable path"
        return f"the file named here ({_length(path)}) cannot be checked: {reason}"
    if not stat.S_ISREG(info.st_mode):
        return f"the path named here ({_length(path)}) is not a regular file"
    if info.st_size > MAX_SECRET_BYTES:
        return (
            f"the file named here ({_length(path)}) is too large for a token "
            f"({info.st_size} > {MAX_SECRET_BYTES} bytes)"
        )
    try:
        # O_NONBLOCK: a FIFO swapped in since the stat() must not make the open wait.
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as error:
        return f"the file named here ({_length(path)}) is not readable: {error.strerror}"
    return None


def _length(path: str) -> str:
    """A path described without quoting it: whether it is absolute, and its length."""
    kind = "an absolute path" if path.startswith("/") else "a relative path"
    return f"{kind} of {len(path)} characters, not shown"


def _kind_problem(path: str, *, directory: bool, required: bool) -> str | None:
    """Say why `path` is not a directory (or not a regular file), or None; missing may be fine."""
    noun = "directory" if directory else "file"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{noun} {path!r} does not exist" if required else None
    except OSError as error:
        return f"{noun} {path!r} cannot be checked: {error.strerror}"
    if directory and not stat.S_ISDIR(info.st_mode):
        return f"{path!r} is not a directory"
    if not directory and not stat.S_ISREG(info.st_mode):
        return f"{path!r} is not a regular file"
    return None


def _same_file(one: str, other: str) -> bool:
    """Whether two paths name one file: equal once symlinks are resolved, or one inode."""
    if os.path.realpath(one) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except (OSError, ValueError):  # either is missing or out of reach: not one inode
        return False


def _named_file_problem(
    path: str, surroundings: Surroundings, sections: Mapping[str, Any]
) -> str | None:
    """Say which other file of the config `path` (or a file kept beside it) would write over.

    Opening the state renames a file that is not a database aside and puts one there: the
    config file or a token file at state.path would be gone at the next start. Only valid
    sections are compared: a refused one's problems are reported already.
    """
    api, admin = sections.get("api"), sections.get("admin")
    named = [
        ("the config file", surroundings.config_path),
        ("api.auth.token_file", api.auth.token_file if isinstance(api, ApiConfig) else ""),
        ("admin.token_file", admin.token_file if isinstance(admin, AdminConfig) else ""),
    ]
    for key, other in named:
        if not other:
            continue
        for suffix in ("", *_STATE_COMPANIONS):
            if _same_file(f"{path}{suffix}", other):
                which = f"the state's {suffix} file" if suffix else "it"
                return f"{which} would be written over {key} ({other!r}); choose another path"
    ingestions = sections.get("ingestions")
    directory = ingestions.directory if isinstance(ingestions, IngestionsConfig) else ""
    if directory and is_within(os.path.realpath(path), os.path.realpath(directory)):
        return f"must be outside ingestions.directory ({directory!r}), symlinks resolved"
    return None
