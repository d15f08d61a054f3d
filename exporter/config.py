"""The configuration file: its shape as frozen dataclasses, and the loader that validates it.

`load_config` reads a YAML file and `parse_config` checks an already-parsed document. Both
report every problem at once in one `ConfigError`, one line per key path, instead of stopping
at the first. Beyond reading the config file this module only looks at the filesystem and the
environment to check that a token file (api.auth, admin) is a readable regular file, that a
token variable is set, that an existing ingestions.directory is a directory and that the
directory of state.path exists, and, when sharding.index is null, it reads the hostname
(HOSTNAME, else the system's). It never reads, keeps or prints a token, and no error message
echoes a value that might be one. It creates nothing: a missing ingestions.directory or state
file is left for the app.

Rules applied to every key:

- a missing key, or a key whose value is `null`, takes its default; a `null` section means
  all defaults;
- an unknown key is an error, and the closest known key is suggested;
- a number is an int or a float, finite; never a bool (YAML reads `yes`/`on` as true) and
  never a string, so `"60"` and `1e3` (a string to YAML 1.1: write `1.0e+3`) are errors;
- an integer is an int, or a float with no fractional part (`5.0` is read as 5; `5.5` is an
  error);
- a boolean is a YAML boolean (true/false, also yes/no/on/off); never 0/1 or a quoted string;
- a path (`ingestions.directory`, `state.path`) is absolute, or "" to disable what it names;
- a choice (`api.auth.type`, `logging.level`, `logging.format`) is case-insensitive and
  stored lower-case.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import stat
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import yaml

from exporter.auth import AUTH_TYPES
from exporter.logs import LEVELS, LOG_FORMATS
from exporter.models import (
    MAX_INGESTION_ID_LENGTH,
    RejectReason,
    format_character,
    ingestion_id_problem,
    refused_character,
)
from exporter.sharding import index_from_hostname

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_PORT",
    "MAX_CONFIG_BYTES",
    "AdminConfig",
    "ApiConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "IngestionsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "NotificationsConfig",
    "PollingConfig",
    "ReloadConfig",
    "ServerConfig",
    "ShardingConfig",
    "SqsConfig",
    "StateConfig",
    "is_loopback_host",
    "load_config",
    "parse_config",
]

DEFAULT_PORT = 10184  # unallocated in Prometheus' default-port list (9100-9999 is full)
DEFAULT_ADMIN_PORT = 10185  # the next one, so a sidecar's two listeners sit side by side
#: Largest processing report the `report` command and the admin API download (32 MiB).
DEFAULT_MAX_REPORT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How requests are authenticated: SigV4 (IAM), a bearer token, or nothing.

    `region` is resolved at load time for sigv4 (from AWS_REGION / AWS_DEFAULT_REGION when
    the file leaves it empty). For bearer, exactly one of `token_file` / `token_env` is set;
    the token itself is read by the auth module, never kept here.
    """

    type: str = "sigv4"
    region: str = ""
    role_arn: str = ""
    token_file: str = ""
    token_env: str = ""
    header: str = "Authorization"
    scheme: str = "Bearer"


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Where the Catalog API is and how hard we may lean on it.

    `base_url` has no trailing "/" and may carry a path prefix such as an API Gateway stage.
    """

    base_url: str
    auth: AuthConfig
    timeout_seconds: float = 10.0
    max_requests_per_second: float = 5.0
    max_concurrency: int = 4
    max_response_bytes: int = 1048576
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES


@dataclass(frozen=True, slots=True)
class PollingConfig:
    """When each ingestion id is polled, retried and forgotten."""

    interval_seconds: float = 60.0
    jitter_ratio: float = 0.1
    terminal_retention_seconds: float = 86400.0
    invalid_retry_seconds: float = 3600.0
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0
    done_retention_seconds: float | None = None  # None: terminal_retention_seconds for DONE too

    def retention_for(self, status: str) -> float:
        """How long a terminal upload's series are kept: DONE may have its own, shorter one."""
        if status == "DONE" and self.done_retention_seconds is not None:
            return self.done_retention_seconds
        return self.terminal_retention_seconds


@dataclass(frozen=True, slots=True)
class IngestionsConfig:
    """Which uploads are tracked, and what is attached to their metrics.

    `ids` and `labels` have duplicates removed, in the order first listed. `directory` is
    where the app drops one file per upload ("" disables it); it may not exist yet.
    `max_tracked` caps the ids tracked from every source together.
    """

    ids: tuple[str, ...] = ()
    directory: str = ""
    directory_poll_seconds: float = 2.0
    max_tracked: int = 100_000
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the metrics endpoint listens (port 0 picks a free port), and how long clients may
    dawdle: idle or half-sent requests are closed after `idle_timeout_seconds`, a scrape not
    read within `write_timeout_seconds` is dropped (so stalled clients cannot pile up bodies).
    """

    host: str = "0.0.0.0"  # noqa: S104 - an exporter in a container must listen on all interfaces
    port: int = DEFAULT_PORT
    idle_timeout_seconds: float = 75.0
    write_timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log level (debug, info, warning, error) and format (json, console), lower-case."""

    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """How many series each upload costs: `all` (one-hot, seven status series) or `active`."""

    status_series: str = "all"


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """How often the config file is checked for changes; 0 leaves only SIGHUP."""

    watch_interval_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP API (register, list and delete ids) on its own listener.

    Loopback by default: in a sidecar the app reaches it on localhost. With `token_file` set
    each request needs "Authorization: Bearer <token>"; the token is read by the server, never
    kept here.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = DEFAULT_ADMIN_PORT
    token_file: str = ""
    #: Host names (besides loopback ones) a request may name in its Host header.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where tracked ids and their state survive restarts ("" disables), and write coalescing."""

    path: str = ""
    debounce_seconds: float = 0.5


@dataclass(frozen=True, slots=True)
class ShardingConfig:
    """This replica's share of the ids: those `exporter.sharding.shard_of` maps to `index`.

    `index` is resolved at load time: the file's value, else the StatefulSet ordinal at the
    end of the hostname ("name-3" -> 3) when `total` > 1, else 0.
    """

    total: int = 1
    index: int = 0


@dataclass(frozen=True, slots=True)
class SqsConfig:
    """An SQS queue of upload-result notifications, used as poll triggers ("" queue_url: off).

    `region` is resolved at load time: the file's, else the queue URL's
    (sqs.<region>.amazonaws.com), else AWS_REGION / AWS_DEFAULT_REGION. `endpoint_url`
    replaces the regional endpoint (LocalStack, moto, a VPC endpoint). Credentials come from
    the AWS default chain, never from here.
    """

    queue_url: str = ""
    region: str = ""
    endpoint_url: str = ""
    register_unknown: bool = False
    wait_seconds: int = 20
    max_messages: int = 10
    confirm_subscriptions: bool = False
    max_backoff_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class NotificationsConfig:
    """Where upload-result notifications come from (only SQS so far)."""

    sqs: SqsConfig = SqsConfig()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    api: ApiConfig
    polling: PollingConfig = PollingConfig()
    ingestions: IngestionsConfig = IngestionsConfig()
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    reload: ReloadConfig = ReloadConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    sharding: ShardingConfig = ShardingConfig()
    notifications: NotificationsConfig = NotificationsConfig()


class ConfigError(Exception):
    """The configuration is unusable.

    `problems` holds one line per bad key, "path: what was expected"; str() joins them with
    newlines.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[str, ...]]]:
        # The default rebuilds from args (the joined text), which would split it into letters.
        return (ConfigError, (self.problems,))


_TOP_LEVEL = "(top level)"
_REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
_MAX_LABELS = 10  # each one is copied onto every upload series
_MAX_SHARDS = 1024  # far more replicas than one account's ~10 requests/s could keep busy
# Label names the exporter itself puts on upload series, or Prometheus adds at scrape time.
_OWN_LABELS = ("ingestion_id", "status", "final_status", "le", "job", "instance")
_YAML_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")
_MAX_ECHO = 60  # longer values are cut in messages
_KINDS: dict[type, str] = {
    str: "a string",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "a mapping",
}

_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 `token`
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+")
# sqs.<region>.amazonaws.com[.cn] and the legacy <region>.queue.amazonaws.com
_SQS_HOST_REGION = re.compile(
    r"(?:sqs\.([a-z]{2}(?:-[a-z0-9]+)+)\.amazonaws\.com(?:\.cn)?"
    r"|([a-z]{2}(?:-[a-z0-9]+)+)\.queue\.amazonaws\.com)"
)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # Prometheus' label name syntax
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
# Only a conventional upper-case name is echoed: a mixed-case value may be a token pasted
# into the wrong key.
_ECHOABLE_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


class _Problems:
    """Every problem found so far, as (key path, what was expected) pairs, in order found."""

    __slots__ = ("_found",)

    def __init__(self) -> None:
        self._found: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self._found.append((path, message))

    def __contains__(self, path: object) -> bool:
        return any(found == path for found, _ in self._found)

    def raise_if_any(self) -> None:
        if self._found:
            raise ConfigError(f"{path}: {message}" for path, message in self._found)


class _Section:
    """One mapping of the document: its key path, its known keys' values, where problems go.

    A value that is not a mapping, and every unknown key, is reported on construction; `ok`
    is False when the value was not a mapping, so callers can skip checks that would only
    repeat that problem.
    """

    __slots__ = ("ok", "path", "problems", "values")

    def __init__(self, problems: _Problems, path: str, value: object, known: Sequence[str]) -> None:
        self.problems = problems
        self.path = path
        self.values: dict[str, object] = {}
        self.ok = True
        if value is None:
            return
        if not isinstance(value, dict):
            problems.add(path or _TOP_LEVEL, f"expected a mapping, got {_describe(value)}")
            self.ok = False
            return
        for key, item in value.items():
            if isinstance(key, str) and key in known:
                self.values[key] = item
            else:
                name = key if isinstance(key, str) else _describe(key)
                self.problem(name, "unknown key" + _did_you_mean(name, known))

    def path_of(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> object:
        return self.values.get(key)

    def child(self, key: str, shape: type[Any]) -> _Section:
        return _Section(self.problems, self.path_of(key), self.get(key), _keys(shape))

    def problem(self, key: str, message: str) -> None:
        self.problems.add(self.path_of(key), message)

    def has_problem(self, key: str) -> bool:
        return self.path_of(key) in self.problems


def _keys(shape: type[Any]) -> tuple[str, ...]:
    return tuple(field.name for field in fields(shape))


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    lowered = {candidate.lower(): candidate for candidate in known}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return f"; did you mean {lowered[matches[0]]!r}?" if matches else ""


def _describe(value: object, *, secret: bool = False) -> str:
    """Show a value in a message: YAML spellings, cut short, or only its kind when `secret`."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if secret or not isinstance(value, str | int | float):
        return _KINDS.get(type(value), f"a value of type {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"
    if isinstance(value, str) and len(value) > _MAX_ECHO:
        return f"{value[:_MAX_ECHO]!r}... ({len(value)} characters)"
    return repr(value)


def _number_hint(value: object) -> str:
    """Explain the two YAML readings that most often turn a number into something else."""
    if isinstance(value, bool):
        return " (YAML reads unquoted yes/no/on/off/true/false as booleans)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string to YAML: drop any quotes, and write exponents like 1.0e+3)"
    return ""


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def _range_text(gt: float | None, ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f" from {_fmt(ge)} to {_fmt(le)}"
    parts = [
        f"{op} {_fmt(bound)}"
        for op, bound in ((">", gt), (">=", ge), ("<=", le))
        if bound is not None
    ]
    return " " + " and ".join(parts) if parts else ""


def _in_range(value: float, gt: float | None, ge: float | None, le: float | None) -> bool:
    return (
        (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le)
    )


def _number(
    section: _Section,
    key: str,
    default: float,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> float:
    """Read a finite number within the bounds; an int is accepted, a bool is not."""
    value = section.get(key)
    if value is None:
        return default
    expected = "a number" + _range_text(gt, ge, le)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and _in_range(number, gt, ge, le):
            return number
    section.problem(key, f"expected {expected}, got {_describe(value)}{_number_hint(value)}")
    return default


def _integer(section: _Section, key: str, default: int, *, ge: int, le: int) -> int:
    """Read an integer within [ge, le]; a float with no fractional part is accepted."""
    value = section.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and ge <= value <= le:
        return value
    expected = "an integer" + _range_text(None, ge, le)
    section.problem(key, f"expected {expected}, got {_describe(value)}{_number_hint(value)}")
    return default


def _boolean(section: _Section, key: str, default: bool) -> bool:
    """Read a YAML boolean; 0/1 and strings such as "true" are not accepted."""
    value = section.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    hint = (
        " (a string to YAML: drop the quotes)"
        if isinstance(value, str) and value.lower() in _YAML_BOOLEAN_WORDS
        else ""
    )
    section.problem(key, f"expected true or false, got {_describe(value)}{hint}")
    return default


def _string(
    section: _Section, key: str, default: str, *, required: bool = False, secret: bool = False
) -> str:
    """Read a string; `secret` keeps the value out of the message (it may be a token)."""
    value = section.get(key)
    if value is None:
        if required:
            section.problem(key, "required")
        return default
    if isinstance(value, str):
        return value
    section.problem(key, f"expected a string, got {_describe(value, secret=secret)}")
    return default


def _choice(section: _Section, key: str, default: str, choices: Sequence[str]) -> str:
    """Read one of `choices`, case-insensitively, stored lower-case."""
    value = _string(section, key, default)
    if value.lower() in choices:
        return value.lower()
    listed = ", ".join(choices)
    section.problem(
        key, f"expected one of {listed}, got {_describe(value)}{_did_you_mean(value, choices)}"
    )
    return default


def _control_character(text: str) -> str | None:
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


def _host(section: _Section, default: str) -> str:
    """Read a listen address: non-empty, without spaces or control characters."""
    host = _string(section, "host", default)
    if not host or _control_character(host) is not None or " " in host:
        section.problem(
            "host", f"expected a host name or address such as {default}, got {_describe(host)}"
        )
    return host


def is_loopback_host(name: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1), given without port."""
    host = name.strip().lower().removesuffix(".").removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _absolute_path_problem(path: str) -> str | None:
    if _control_character(path) is not None:
        return "must not contain control characters"
    if not os.path.isabs(path):
        return f"expected an absolute path, got {_describe(path)}"
    return None


def _is_within(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _base_url_problem(url: str) -> str | None:
    """Say what is wrong with `url` as the API's base URL, or None when it is usable."""
    if _control_character(url) is not None or " " in url:
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return "is not a valid URL (check the host and port)"
    # Credentials, a query or a fragment may hold secrets (?api_key=...): those are checked
    # first and their messages never echo the URL.
    checks = (
        ("@" in parts.netloc, "must not contain credentials; configure api.auth instead"),
        ("?" in url, "must not have a query string: the exporter sends its own request"),
        ("#" in url, "must not have a fragment"),
        (
            parts.scheme not in ("http", "https"),
            f"expected an http:// or https:// URL, got {_describe(url)}",
        ),
        (not parts.hostname, f"expected a URL with a host, got {_describe(url)}"),
    )
    return next((message for failed, message in checks if failed), None)


def _token_file_problem(path: str) -> str | None:
    """Say why the token file cannot be used, or None; the file's content is never read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"file {path!r} does not exist"
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        return f"file {path!r} cannot be checked: {reason}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path!r} is not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        return f"file {path!r} is not readable: {error.strerror}"
    return None


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


def _state_file_problem(path: str) -> str | None:
    """Say why `path` cannot hold the state, or None; the file itself may be missing.

    What is at the path itself is not checked: a directory or an unreadable file there is
    found at start, where the exporter runs without persistence instead of exiting (a
    container restarted on exit would crash-loop).
    """
    if path.endswith("/"):
        return f"expected a file name after the last '/', got {path!r}"
    return _kind_problem(os.path.dirname(path), directory=True, required=True)


def _resolve_region(section: _Section, region: str, environ: Mapping[str, str]) -> str:
    """Take the region from the file, else from the environment, and check its shape."""
    source = ""
    if not region:
        for name in _REGION_ENV_VARS:
            if environ.get(name):
                region, source = environ[name], f" (from {name})"
                break
        else:
            section.problem(
                "region",
                "required with type: sigv4; set it here or in AWS_REGION or AWS_DEFAULT_REGION",
            )
            return ""
    if not _REGION.fullmatch(region):
        section.problem(
            "region", f"expected an AWS region such as us-east-1, got {_describe(region)}{source}"
        )
    return region


def _check_bearer_source(
    section: _Section, token_file: str, token_env: str, environ: Mapping[str, str]
) -> None:
    if bool(token_file) == bool(token_env):
        if not (section.has_problem("token_file") or section.has_problem("token_env")):
            which = "both are set" if token_file else "neither is set"
            section.problems.add(
                section.path, f"type: bearer needs exactly one of token_file or token_env; {which}"
            )
        return
    if token_file:
        problem = _token_file_problem(token_file)
        if problem:
            section.problem("token_file", problem)
    elif not environ.get(token_env, "").strip():
        name = (
            repr(token_env)
            if _ECHOABLE_ENV_NAME.fullmatch(token_env)
            else "named here (name not shown: is it the token itself?)"
        )
        section.problem("token_env", f"environment variable {name} is not set or is empty")


def _read_auth(section: _Section, environ: Mapping[str, str]) -> AuthConfig:
    if not section.ok:
        return AuthConfig()
    auth_type = _choice(section, "type", "sigv4", AUTH_TYPES)
    region = _string(section, "region", "")
    role_arn = _string(section, "role_arn", "")
    token_file = _string(section, "token_file", "")
    token_env = _string(section, "token_env", "", secret=True)
    header = _string(section, "header", "Authorization", secret=True)
    scheme = _string(section, "scheme", "Bearer", secret=True)

    if role_arn and not role_arn.startswith("arn:"):
        section.problem(
            "role_arn",
            "expected a role ARN such as arn:aws:iam::123456789012:role/name, "
            f"got {_describe(role_arn)}",
        )
    if not _HTTP_TOKEN.fullmatch(header):
        section.problem("header", "expected an HTTP header name such as Authorization")
    if scheme and not _HTTP_TOKEN.fullmatch(scheme):
        section.problem("scheme", 'expected one word such as Bearer, or "" for the bare token')

    if section.has_problem("type"):
        pass  # which keys apply is unknown, so checking them would only add noise
    elif auth_type == "sigv4":
        if not section.has_problem("region"):
            region = _resolve_region(section, region, environ)
        for key, value in (("token_file", token_file), ("token_env", token_env)):
            if value:
                section.problem(key, "only used with type: bearer")
    elif auth_type == "bearer":
        _check_bearer_source(section, token_file, token_env, environ)

    return AuthConfig(
        type=auth_type,
        region=region,
        role_arn=role_arn,
        token_file=token_file,
        token_env=token_env,
        header=header,
        scheme=scheme,
    )


def _read_api(section: _Section, environ: Mapping[str, str]) -> ApiConfig:
    if not section.ok:
        return ApiConfig(base_url="", auth=AuthConfig())
    base_url = _string(section, "base_url", "", required=True)
    if "base_url" in section.values and not section.has_problem("base_url"):
        problem = _base_url_problem(base_url)
        if problem:
            section.problem("base_url", problem)
    return ApiConfig(
        base_url=base_url.rstrip("/"),
        auth=_read_auth(section.child("auth", AuthConfig), environ),
        timeout_seconds=_number(section, "timeout_seconds", 10.0, gt=0, le=300),
        max_requests_per_second=_number(section, "max_requests_per_second", 5.0, gt=0, le=10000),
        max_concurrency=_integer(section, "max_concurrency", 4, ge=1, le=256),
        max_response_bytes=_integer(
            section, "max_response_bytes", 1048576, ge=1024, le=64 * 1024 * 1024
        ),
        max_report_bytes=_integer(
            section, "max_report_bytes", DEFAULT_MAX_REPORT_BYTES, ge=1024, le=1024**3
        ),
    )


def _read_polling(section: _Section) -> PollingConfig:
    polling = PollingConfig(
        interval_seconds=_number(section, "interval_seconds", 60.0, gt=0, le=86400),
        jitter_ratio=_number(section, "jitter_ratio", 0.1, ge=0, le=0.5),
        terminal_retention_seconds=_number(section, "terminal_retention_seconds", 86400.0, ge=0),
        invalid_retry_seconds=_number(section, "invalid_retry_seconds", 3600.0, gt=0),
        initial_backoff_seconds=_number(section, "initial_backoff_seconds", 1.0, gt=0),
        max_backoff_seconds=_number(section, "max_backoff_seconds", 300.0, gt=0),
        done_retention_seconds=(
            None
            if section.get("done_retention_seconds") is None
            else _number(section, "done_retention_seconds", 0.0, ge=0)
        ),
    )
    initial, maximum = polling.initial_backoff_seconds, polling.max_backoff_seconds
    if (
        maximum < initial
        and not section.has_problem("initial_backoff_seconds")
        and not section.has_problem("max_backoff_seconds")
    ):
        section.problem(
            "max_backoff_seconds",
            f"expected a number >= {section.path_of('initial_backoff_seconds')} ({_fmt(initial)}), "
            f"got {_fmt(maximum)}",
        )
    return polling


def _ingestion_id_problem(value: object) -> str | None:
    """The shared rule (`models.ingestion_id_problem`), worded for a config file."""
    reason = ingestion_id_problem(value)
    if reason is None:
        return None
    if reason is RejectReason.NOT_A_STRING:
        return f"expected a string (quote ids in YAML), got {_describe(value)}"
    assert isinstance(value, str)
    if reason is RejectReason.EMPTY:
        return "must not be empty"
    if reason is RejectReason.TOO_LONG:
        return f"expected at most {MAX_INGESTION_ID_LENGTH} characters, got {len(value)}"
    if reason is RejectReason.FORMAT_CHARACTERS:
        invisible = format_character(value) or "?"
        return (
            f"must not contain invisible format characters, found {invisible!r} "
            f"(U+{ord(invisible):04X}) in {_describe(value)}"
        )
    char = refused_character(value)
    return f"must not contain control characters, found {char!r} in {_describe(value)}"


def _host_name_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_describe(value)}"
    if not _HOST_NAME.fullmatch(value.lower().removesuffix(".")) and not _is_ip_address(value):
        return f"expected a host name or IP address, without port, got {_describe(value)}"
    return None


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _label_name_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_describe(value)}"
    if not _LABEL_NAME.fullmatch(value):
        return f"expected a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*), got {_describe(value)}"
    if value.startswith("__"):
        return f"names starting with '__' are reserved by Prometheus, got {_describe(value)}"
    if value in _OWN_LABELS:
        return f"{value!r} is one of the exporter's own labels ({', '.join(_OWN_LABELS)})"
    return None


def _unique_strings(
    section: _Section, key: str, what: str, problem_of: Callable[[object], str | None]
) -> tuple[str, ...]:
    """Read a list; each bad item is reported by its index, duplicates are dropped."""
    raw = section.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        section.problem(key, f"expected a list of {what}, got {_describe(raw)}")
        return ()
    unique: dict[str, None] = {}  # a dict keeps first-seen order
    for index, value in enumerate(raw):
        problem = problem_of(value)
        if problem:
            section.problems.add(f"{section.path_of(key)}[{index}]", problem)
        elif isinstance(value, str):
            unique.setdefault(value)
    return tuple(unique)


def _read_ingestions(section: _Section) -> IngestionsConfig:
    ingestions = IngestionsConfig(
        ids=_unique_strings(section, "ids", "ingestion ids", _ingestion_id_problem),
        directory=_string(section, "directory", ""),
        directory_poll_seconds=_number(section, "directory_poll_seconds", 2.0, gt=0, le=3600),
        max_tracked=_integer(section, "max_tracked", 100_000, ge=1, le=10_000_000),
        labels=_unique_strings(section, "labels", "label names", _label_name_problem),
    )
    if ingestions.directory and not section.has_problem("directory"):
        # Missing is fine: an emptyDir or a mount may only appear once the app starts.
        problem = _absolute_path_problem(ingestions.directory) or _kind_problem(
            ingestions.directory, directory=True, required=False
        )
        if problem:
            section.problem("directory", problem)
    if len(ingestions.labels) > _MAX_LABELS:
        section.problem(
            "labels",
            f"expected at most {_MAX_LABELS} label names, got {len(ingestions.labels)}",
        )
    if len(ingestions.ids) > ingestions.max_tracked and not section.has_problem("max_tracked"):
        section.problem(
            "ids",
            f"{len(ingestions.ids)} ids exceed {section.path_of('max_tracked')} "
            f"{ingestions.max_tracked}",
        )
    return ingestions


def _read_server(section: _Section) -> ServerConfig:
    return ServerConfig(
        host=_host(section, ServerConfig().host),
        port=_integer(section, "port", DEFAULT_PORT, ge=0, le=65535),
        idle_timeout_seconds=_number(section, "idle_timeout_seconds", 75.0, gt=0, le=3600),
        write_timeout_seconds=_number(section, "write_timeout_seconds", 60.0, gt=0, le=3600),
    )


def _read_logging(section: _Section) -> LoggingConfig:
    return LoggingConfig(
        level=_choice(section, "level", "info", tuple(LEVELS)),
        format=_choice(section, "format", "json", LOG_FORMATS),
    )


def _read_metrics(section: _Section) -> MetricsConfig:
    return MetricsConfig(status_series=_choice(section, "status_series", "all", ("all", "active")))


def _read_reload(section: _Section) -> ReloadConfig:
    return ReloadConfig(
        watch_interval_seconds=_number(section, "watch_interval_seconds", 5.0, ge=0)
    )


def _read_admin(section: _Section, server: ServerConfig) -> AdminConfig:
    admin = AdminConfig(
        enabled=_boolean(section, "enabled", True),
        host=_host(section, AdminConfig().host),
        port=_integer(section, "port", DEFAULT_ADMIN_PORT, ge=0, le=65535),
        token_file=_string(section, "token_file", ""),
        allowed_hosts=_unique_strings(section, "allowed_hosts", "host names", _host_name_problem),
    )
    if not admin.enabled or section.has_problem("enabled"):
        return admin  # no listener (or unknown whether one): its port and token do not matter
    if not (admin.token_file or is_loopback_host(admin.host) or section.has_problem("host")):
        section.problem(
            "host",
            f"{admin.host!r} is not a loopback address (127.0.0.1, ::1, localhost): anyone who "
            f"can reach it could register and delete ids; set {section.path_of('token_file')} "
            "too",
        )
    # Equal ports are refused whatever the hosts: 0.0.0.0 overlaps every address, and telling
    # which names resolve to the same address is not a load-time question. 0 is always free.
    if (
        admin.port == server.port != 0
        and not section.has_problem("port")
        and "server.port" not in section.problems
    ):
        section.problem("port", f"must differ from server.port ({server.port})")
    if admin.token_file and not section.has_problem("token_file"):
        problem = _token_file_problem(admin.token_file)
        if problem:
            section.problem("token_file", problem)
    return admin


def _read_state(section: _Section, ingestions: IngestionsConfig) -> StateConfig:
    state = StateConfig(
        path=_string(section, "path", ""),
        debounce_seconds=_number(section, "debounce_seconds", 0.5, ge=0, le=60),
    )
    if not state.path or section.has_problem("path"):
        return state
    directory = "" if "ingestions.directory" in section.problems else ingestions.directory
    problem = _absolute_path_problem(state.path)
    if problem is None and directory and _is_within(state.path, directory):
        # The app drops one file per upload there: the state file would be read as one.
        problem = f"must be outside ingestions.directory ({directory!r})"
    if problem is None:
        problem = _state_file_problem(state.path)
    if problem:
        section.problem("path", problem)
    return state


def _read_sharding(section: _Section, hostname: Callable[[], str]) -> ShardingConfig:
    """Read total and index; a null index comes from the hostname's StatefulSet ordinal."""
    total = _integer(section, "total", 1, ge=1, le=_MAX_SHARDS)
    if section.get("index") is not None:
        index = _integer(section, "index", 0, ge=0, le=_MAX_SHARDS - 1)
        if index >= total and not section.has_problem("index"):
            if not section.has_problem("total"):
                section.problem(
                    "index",
                    f"expected an integer from 0 to {total - 1} "
                    f"(below {section.path_of('total')} {total}), got {index}",
                )
            index = 0
        return ShardingConfig(total=total, index=index)
    if total == 1 or section.has_problem("total"):
        return ShardingConfig(total=total)
    name = hostname()
    ordinal = index_from_hostname(name)
    if ordinal is None:
        section.problem(
            "index",
            f"set {section.path_of('index')} or run in a StatefulSet whose pod names end in "
            f"-<ordinal>; hostname {_describe(name)} has none",
        )
        return ShardingConfig(total=total)
    if ordinal >= total:
        section.problem(
            "index",
            f"hostname {_describe(name)} gives ordinal {ordinal}, but "
            f"{section.path_of('total')} is {total} (ordinals 0 to {total - 1}): run as many "
            f"replicas as {section.path_of('total')}, or set {section.path_of('index')}",
        )
        return ShardingConfig(total=total)
    return ShardingConfig(total=total, index=ordinal)


def _read_sqs(section: _Section, environ: Mapping[str, str]) -> SqsConfig:
    sqs = SqsConfig(
        queue_url=_string(section, "queue_url", ""),
        region=_string(section, "region", ""),
        endpoint_url=_string(section, "endpoint_url", ""),
        register_unknown=_boolean(section, "register_unknown", False),
        # SQS's own limits: long polls of at most 20 s, batches of at most 10.
        wait_seconds=_integer(section, "wait_seconds", 20, ge=0, le=20),
        max_messages=_integer(section, "max_messages", 10, ge=1, le=10),
        confirm_subscriptions=_boolean(section, "confirm_subscriptions", False),
        max_backoff_seconds=_number(section, "max_backoff_seconds", 60.0, gt=0, le=3600),
    )
    for key in ("queue_url", "endpoint_url"):
        url = getattr(sqs, key)
        if url and not section.has_problem(key):
            problem = _base_url_problem(url)
            if problem:
                section.problem(key, problem)
    if not sqs.queue_url or section.has_problem("queue_url"):
        return sqs  # off: the region is not needed
    region = sqs.region
    if not region:
        host = urllib.parse.urlsplit(sqs.queue_url).hostname or ""
        found = _SQS_HOST_REGION.fullmatch(host)
        region = (found.group(1) or found.group(2)) if found else ""
    if not region:
        region = next((environ[name] for name in _REGION_ENV_VARS if environ.get(name)), "")
    if not region:
        section.problem(
            "region",
            "required when queue_url is not on sqs.<region>.amazonaws.com; set it here or in "
            "AWS_REGION or AWS_DEFAULT_REGION",
        )
    elif not _REGION.fullmatch(region):
        section.problem(
            "region", f"expected an AWS region such as us-east-1, got {_describe(region)}"
        )
    return SqsConfig(
        queue_url=sqs.queue_url,
        region=region,
        endpoint_url=sqs.endpoint_url.rstrip("/"),
        register_unknown=sqs.register_unknown,
        wait_seconds=sqs.wait_seconds,
        max_messages=sqs.max_messages,
        confirm_subscriptions=sqs.confirm_subscriptions,
        max_backoff_seconds=sqs.max_backoff_seconds,
    )


def _read_notifications(section: _Section, environ: Mapping[str, str]) -> NotificationsConfig:
    return NotificationsConfig(sqs=_read_sqs(section.child("sqs", SqsConfig), environ))


def parse_config(
    data: object,
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> Config:
    """Validate an already-parsed YAML document.

    `environ` defaults to os.environ. `hostname` is read only to resolve a null
    sharding.index; it defaults to environ["HOSTNAME"] (Kubernetes sets it to the pod name),
    else socket.gethostname().
    """
    env = os.environ if environ is None else environ

    def resolve_hostname() -> str:
        if hostname is not None:
            return hostname
        return env.get("HOSTNAME") or socket.gethostname()

    problems = _Problems()
    if data is None:
        problems.add(_TOP_LEVEL, "the document is empty; at least api.base_url is required")
    elif not isinstance(data, dict):
        problems.add(_TOP_LEVEL, f"expected a mapping of sections, got {_describe(data)}")
    problems.raise_if_any()

    root = _Section(problems, "", data, _keys(Config))
    # Read in field order, which is the order problems are listed in; admin and state are
    # checked against sections read before them.
    api = _read_api(root.child("api", ApiConfig), env)
    polling = _read_polling(root.child("polling", PollingConfig))
    ingestions = _read_ingestions(root.child("ingestions", IngestionsConfig))
    server = _read_server(root.child("server", ServerConfig))
    config = Config(
        api=api,
        polling=polling,
        ingestions=ingestions,
        server=server,
        logging=_read_logging(root.child("logging", LoggingConfig)),
        metrics=_read_metrics(root.child("metrics", MetricsConfig)),
        reload=_read_reload(root.child("reload", ReloadConfig)),
        admin=_read_admin(root.child("admin", AdminConfig), server),
        state=_read_state(root.child("state", StateConfig), ingestions),
        sharding=_read_sharding(root.child("sharding", ShardingConfig), resolve_hostname),
        notifications=_read_notifications(root.child("notifications", NotificationsConfig), env),
    )
    problems.raise_if_any()
    return config


#: The largest config file read, in bytes. The file is refused before it is parsed: a 64 MB
#: document took 16 s and almost 1 GB to parse only to be rejected, on every reload too.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_MERGE_TAG = "tag:yaml.org,2002:merge"
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml.safe_load's loader (libyaml's when PyYAML has it) that notes repeated keys.

    PyYAML keeps the last of two equal keys in a mapping without a word, so a second
    `polling:` section silently replaced the first. Each repeat is noted as (key path, first
    line, repeated line); the document is still built, and the caller refuses it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []
        self._root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # `<<: *defaults` overriding is what merge keys are for
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                self.duplicates.append(
                    (
                        self._path_of(node, key),
                        first.start_mark.line + 1,
                        key_node.start_mark.line + 1,
                    )
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    def _path_of(self, target: yaml.Node, key: object) -> str:
        """The key path of `key` in mapping `target`, searched from the document's root."""
        leaf = key if isinstance(key, str) else _describe(key)
        stack: list[tuple[yaml.Node, str]] = [(self._root, "")] if self._root else []
        visited: set[int] = set()
        while stack:
            node, path = stack.pop()
            if node is target:
                return f"{path}.{leaf}" if path else leaf
            if id(node) in visited:
                continue  # an alias seen before: each node is searched once
            visited.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    stack.append((value_node, f"{path}.{name}" if path else str(name)))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        return leaf


def _read_text(name: str) -> str:
    """The file's text, refused before it is read in full when over MAX_CONFIG_BYTES."""
    too_big = (
        f"{name}: the file is larger than {MAX_CONFIG_BYTES} bytes (16 MiB), the most a "
        "config may be; list many ids in ingestions.directory or the admin API instead"
    )
    try:
        with open(name, "rb") as file:
            if os.fstat(file.fileno()).st_size > MAX_CONFIG_BYTES:
                raise ConfigError([too_big])
            # Bounded even when the size was wrong (a FIFO, /proc) or the file grew since.
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([f"{name}: cannot read the file: {error.strerror}"]) from None
    except ValueError as error:  # a NUL in the path
        raise ConfigError([f"{name}: cannot read the file: {error}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([too_big])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{name}: cannot read the file: {error}"]) from None


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> Config:
    """Read (at most MAX_CONFIG_BYTES), parse (safe YAML, no repeated keys) and validate.

    Every failure is a ConfigError. `environ` and `hostname` are as for `parse_config`.
    """
    name = os.fspath(path)
    text = _read_text(name)
    # libyaml's loader when PyYAML has it: 100,000 ids load in a fraction of the time.
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        # Our own wording: str(error) quotes the offending lines of the document.
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = error.problem or error.context or "invalid YAML"
        raise ConfigError([f"{name}: YAML syntax error{where}: {what}"]) from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ConfigError([f"{name}: not valid YAML: {type(error).__name__}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            f"{key_path}: key repeated in {name} at lines {first} and {again}; "
            "YAML would keep only the last, so say it once"
            for key_path, first, again in loader.duplicates
        )
    if data is None:
        raise ConfigError([f"{name}: the file is empty; at least api.base_url is required"])
    return parse_config(data, environ=environ, hostname=hostname)
