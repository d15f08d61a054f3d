"""The configuration file's shape as frozen pydantic models: the document in, a model out.

The models are the one source of every key, default, type, range and choice: `config`
validates documents through them and `config_schema` generates the JSON Schema from them.
Validation here is pure: it reads nothing but the document, so the same document gives the
same answer anywhere. What needs the filesystem or the environment (token files, the
directories, the state path's neighbours, regions from AWS_REGION, the hostname's ordinal)
is `config_preflight`'s, run by `config.parse_config` after these models accept a document:
a key those checks fill in (`api.auth.region`, `sharding.index`, `notifications.sqs.region`)
is left empty, or unset, here. Problems are raised in our own words (`config_wording`).

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
- a choice (`api.auth.type`, `logging.level`, `logging.format`, `metrics.status_series`) is
  case-insensitive and stored lower-case.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import ErrorDetails, core_schema

from exporter.auth import AuthType
from exporter.config_wording import SECRET, Wording, describe, fmt, refusal
from exporter.config_wording import problem as _problem
from exporter.logs import LogFormat, LogLevel
from exporter.models import (
    MAX_INGESTION_ID_LENGTH,
    RejectReason,
    format_character,
    ingestion_id_pattern,
    ingestion_id_problem,
    not_nfc_character,
    refused_character,
)

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_PORT",
    "REGION",
    "AdminConfig",
    "ApiConfig",
    "AuthConfig",
    "Config",
    "IngestionsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "NotificationsConfig",
    "PollingConfig",
    "ProxyConfig",
    "ReloadConfig",
    "Section",
    "ServerConfig",
    "ShardingConfig",
    "SqsConfig",
    "StateConfig",
    "is_loopback_host",
    "is_within",
    "validate_document",
    "validate_section",
]

DEFAULT_PORT = 10184  # unallocated in Prometheus' default-port list (9100-9999 is full)
DEFAULT_ADMIN_PORT = 10185  # the next one, so a sidecar's two listeners sit side by side
DEFAULT_PROXY_PORT = DEFAULT_ADMIN_PORT + 1  # the signing proxy, beside the admin API
#: Largest request body the proxy forwards: API Gateway's own payload limit (10 MB), so no
#: body the API would take is refused, and no larger one is held in memory to be refused there.
DEFAULT_PROXY_MAX_BODY_BYTES = 10 * 1024 * 1024
#: Largest processing report the `report` command and the admin API download (32 MiB).
DEFAULT_MAX_REPORT_BYTES = 32 * 1024 * 1024

StatusSeries = Literal["all", "active"]
#: How the watched directory is read (see exporter.discovery).
DirectoryMode = Literal["watch", "spool"]

_MAX_LABELS = 10  # each one is copied onto every upload series
_MAX_SHARDS = 1024  # far more replicas than one account's ~10 requests/s could keep busy
# Label names the exporter itself puts on upload series, or Prometheus adds at scrape time.
_OWN_LABELS = ("ingestion_id", "status", "final_status", "le", "job", "instance")

_HTTP_WORD = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 7230 `token`
#: What an AWS region looks like (us-east-1), wherever it was read from.
REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+")
# sqs.<region>.amazonaws.com[.cn] and the legacy <region>.queue.amazonaws.com
_SQS_HOST_REGION = re.compile(
    r"(?:sqs\.([a-z]{2}(?:-[a-z0-9]+)+)\.amazonaws\.com(?:\.cn)?"
    r"|([a-z]{2}(?:-[a-z0-9]+)+)\.queue\.amazonaws\.com)"
)
# API Gateway: <id>.execute-api.<region>.amazonaws.com[.cn], and its VPC endpoint names
# <id>-<vpce id>.execute-api.<region>.vpce.amazonaws.com
_EXECUTE_API_HOST_REGION = re.compile(
    r"\.execute-api\.([a-z]{2}(?:-[a-z0-9]+)+)\.(?:vpce\.)?amazonaws\.com(?:\.cn)?$"
)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # Prometheus' label name syntax
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


# What the checks may look at besides the value


@dataclass(frozen=True, slots=True)
class _Document:
    """The validation context `validate_document` passes: the sections validated so far,
    by name, for the checks across sections (ports, paths, caps)."""

    validated: dict[str, Any] = field(default_factory=dict)


def _validated(info: ValidationInfo, section: str) -> Any:
    """An earlier section of the document, when it was valid (and the document is parsed)."""
    return info.context.validated.get(section) if isinstance(info.context, _Document) else None


# Value checks shared by several keys


def _integral(value: object) -> object:
    """`5.0` where an integer is expected is read as 5; `5.5` is left to be refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    """Duplicates dropped, in the order first listed (a dict keeps insertion order)."""
    return tuple(dict.fromkeys(values))


_INTEGRAL = BeforeValidator(_integral)
_CHOICE = BeforeValidator(_lower)
_LIST = BeforeValidator(_as_tuple)


def _control_character(text: str) -> str | None:
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


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


def absolute_path_problem(path: str) -> str | None:
    if _control_character(path) is not None:
        return "must not contain control characters"
    if not os.path.isabs(path):
        return f"expected an absolute path, got {describe(path)}"
    return None


def is_within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or below it, as written (symlinks are preflight's)."""
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
            f"expected an http:// or https:// URL, got {describe(url)}",
        ),
        (not parts.hostname, f"expected a URL with a host, got {describe(url)}"),
    )
    return next((message for failed, message in checks if failed), None)


def _checked(problem_of: Callable[[Any], str | None]) -> AfterValidator:
    """A validator refusing a value `problem_of` finds fault with, in its words."""

    def check(value: Any) -> Any:
        problem = problem_of(value)
        if problem:
            raise _problem(problem)
        return value

    return AfterValidator(check)


def _ingestion_id_problem(value: object) -> str | None:
    """The shared rule (`models.ingestion_id_problem`), worded for a config file."""
    reason = ingestion_id_problem(value)
    if reason is None:
        return None
    if reason is RejectReason.NOT_A_STRING:
        return f"expected a string (quote ids in YAML), got {describe(value)}"
    assert isinstance(value, str)
    if reason is RejectReason.EMPTY:
        return "must not be empty"
    if reason is RejectReason.TOO_LONG:
        return f"expected at most {MAX_INGESTION_ID_LENGTH} characters, got {len(value)}"
    return _character_problem(reason, value)


def _character_problem(reason: RejectReason, value: str) -> str:
    """An id refused for a character in it, worded with the character's code point."""
    if reason is RejectReason.FORMAT_CHARACTERS:
        invisible = format_character(value) or "?"
        return (
            f"must not contain invisible format characters, found {invisible!r} "
            f"(U+{ord(invisible):04X}) in {describe(value)}"
        )
    if reason is RejectReason.NOT_NFC:
        return _not_nfc_problem(value)
    char = refused_character(value)
    return f"must not contain control characters, found {char!r} in {describe(value)}"


def _not_nfc_problem(value: str) -> str:
    """Names the decomposed code points: they look like nothing else in a terminal either."""
    at = not_nfc_character(value) or 0
    end = at + 1
    while end < len(value) and unicodedata.combining(value[end]):
        end += 1
    points = " ".join(f"U+{ord(char):04X}" for char in value[at:end])
    return (
        "must be in Unicode normalization form NFC (composed characters), found "
        f"{points} at character {at + 1} of {describe(value)}: it looks the same as "
        "another spelling of the id; write the id exactly as the API issued it"
    )


def _host_name_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {describe(value)}"
    if not _HOST_NAME.fullmatch(value.lower().removesuffix(".")) and not _is_ip_address(value):
        return f"expected a host name or IP address, without port, got {describe(value)}"
    return None


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _label_name_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {describe(value)}"
    if not _LABEL_NAME.fullmatch(value):
        return f"expected a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*), got {describe(value)}"
    if value.startswith("__"):
        return f"names starting with '__' are reserved by Prometheus, got {describe(value)}"
    if value in _OWN_LABELS:
        return f"{value!r} is one of the exporter's own labels ({', '.join(_OWN_LABELS)})"
    return None


def _first_checked(problem_of: Callable[[object], str | None]) -> BeforeValidator:
    """Check an item before its type is: our message covers a wrong type too."""

    def check(value: object) -> object:
        problem = problem_of(value)
        if problem:
            raise _problem(problem)
        return value

    return BeforeValidator(check)


def _at_most_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    if len(labels) > _MAX_LABELS:
        raise _problem(f"expected at most {_MAX_LABELS} label names, got {len(labels)}")
    return labels


def _base_url(url: str) -> str:
    problem = _base_url_problem(url)
    if problem:
        raise _problem(problem)
    return url.rstrip("/")


def _listen_host(model: type[BaseModel], host: str) -> str:
    """A listen address: non-empty, without spaces or control characters."""
    if not host or _control_character(host) is not None or " " in host:
        default = model.model_fields["host"].default
        raise _problem(f"expected a host name or address such as {default}, got {describe(host)}")
    return host


def _directory_problem(directory: str) -> str | None:
    return absolute_path_problem(directory) if directory else None


# A missing section is an empty one, validated like any other: the sections' own checks
# (the sigv4 region from the environment, say) run for it too.
_SECTION_DEFAULT: Any = Field(default_factory=dict, validate_default=True)


class _IngestionIdSchema:
    """An id's JSON Schema, from the loader's own rule (`models`), built only when asked."""

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_INGESTION_ID_LENGTH,
            "pattern": ingestion_id_pattern(),
            "description": (
                "An ingestionId as the API issued it: no control, separator, surrogate or "
                "invisible format character (Unicode categories Cc, Zl, Zp, Cs, Cf, by the "
                f"Unicode {unicodedata.unidata_version} tables). The loader also refuses an "
                "id not in Unicode normalization form NFC, which no pattern can say."
            ),
        }


IngestionId = Annotated[str, _first_checked(_ingestion_id_problem), _IngestionIdSchema()]
LabelName = Annotated[
    str,
    _first_checked(_label_name_problem),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^(?!__)[a-zA-Z_][a-zA-Z0-9_]*$",
            "not": {"enum": list(_OWN_LABELS)},
        }
    ),
]
HostName = Annotated[str, _first_checked(_host_name_problem)]
ListenPort = Annotated[int, Field(ge=0, le=65535), _INTEGRAL]


# The models


class Section(BaseModel):
    """A mapping of the document: strict types, unknown keys refused, frozen once built."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class AuthConfig(Section):
    """How requests are authenticated: SigV4 (IAM), a bearer token, or nothing.

    `region` is resolved at load time for sigv4 (from AWS_REGION / AWS_DEFAULT_REGION when
    the file leaves it empty). For bearer, exactly one of `token_file` / `token_env` is set;
    the token itself is read by the auth module, never kept here.
    """

    # Docstrings of the models are the schema's descriptions: what is resolved at load time
    # from the surroundings (region, the token source) is config_preflight's.

    type: Annotated[AuthType, _CHOICE] = "sigv4"
    region: str = ""
    role_arn: Annotated[
        str,
        _checked(
            lambda arn: (
                "expected a role ARN such as arn:aws:iam::123456789012:role/name, "
                f"got {describe(arn, secret=True)}"
                if arn and not arn.startswith("arn:")
                else None
            )
        ),
        Field(json_schema_extra={"pattern": "^(arn:.*)?$"}),
    ] = ""
    token_file: str = ""
    token_env: Annotated[str, SECRET] = ""
    header: Annotated[
        str,
        SECRET,
        _checked(
            lambda name: (
                None
                if re.fullmatch(_HTTP_WORD, name)
                else "expected an HTTP header name such as Authorization"
            )
        ),
        Field(json_schema_extra={"pattern": f"^{_HTTP_WORD}$"}),
    ] = "Authorization"
    scheme: Annotated[
        str,
        SECRET,
        _checked(
            lambda word: (
                None
                if not word or re.fullmatch(_HTTP_WORD, word)
                else 'expected one word such as Bearer, or "" for the bare token'
            )
        ),
        Field(json_schema_extra={"pattern": f"^({_HTTP_WORD})?$"}),
    ] = "Bearer"

    @model_validator(mode="after")
    def _check_for_type(self) -> AuthConfig:
        """The keys each type takes: a region's shape for sigv4, one token source for bearer.

        A missing region, the token file and the token variable are the pre-flight's.
        """
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.type == "sigv4":
            if self.region and not REGION.fullmatch(self.region):
                problems.append(
                    (
                        ("region",),
                        "expected an AWS region such as us-east-1, "
                        f"got {describe(self.region, secret=True)}",
                    )
                )
            problems.extend(
                ((key,), "only used with type: bearer")
                for key in ("token_file", "token_env")
                if getattr(self, key)
            )
        elif self.type == "bearer" and bool(self.token_file) == bool(self.token_env):
            which = "both are set" if self.token_file else "neither is set"
            problems.append(
                ((), f"type: bearer needs exactly one of token_file or token_env; {which}")
            )
        if problems:
            raise refusal(type(self).__name__, self, problems)
        return self


class ApiConfig(Section):
    """Where the Catalog API is and how hard we may lean on it.

    `base_url` has no trailing "/" and may carry a path prefix such as an API Gateway stage.
    On an API Gateway host (<id>.execute-api.<region>.amazonaws.com), that region is the
    sigv4 region when `auth.region` is empty, before AWS_REGION / AWS_DEFAULT_REGION.
    """

    @model_validator(mode="before")
    @classmethod
    def _region_from_host(cls, data: Any) -> Any:
        """sigv4's region from an execute-api host name, when the file sets none."""
        if not isinstance(data, dict) or not isinstance(data.get("base_url"), str):
            return data
        auth = data.get("auth")
        auth = {} if auth is None else auth
        if not isinstance(auth, dict) or auth.get("region") or auth.get("type", "sigv4") != "sigv4":
            return data
        host = urllib.parse.urlsplit(data["base_url"]).hostname or ""
        found = _EXECUTE_API_HOST_REGION.search(host)
        if found is None:
            return data
        return {**data, "auth": {**auth, "region": found.group(1)}}

    base_url: Annotated[
        str, AfterValidator(_base_url), Field(json_schema_extra={"pattern": "^https?://[^?#@ ]+$"})
    ]
    # Every key below may hold a credential pasted in the wrong place: no value is quoted.
    auth: Annotated[AuthConfig, SECRET] = _SECTION_DEFAULT
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_requests_per_second: Annotated[float, Field(gt=0, le=10000)] = 5.0
    max_concurrency: Annotated[int, Field(ge=1, le=256), _INTEGRAL] = 4
    max_response_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024), _INTEGRAL] = 1048576
    max_report_bytes: Annotated[int, Field(ge=1024, le=1024**3), _INTEGRAL] = (
        DEFAULT_MAX_REPORT_BYTES
    )
    #: Report hosts (names or addresses, as a reportDownloadLink gives them) that may be
    #: fetched although they resolve to a loopback, private or link-local address, and over
    #: plain http: the simulator, a test's server. Empty in production: only public https.
    report_hosts: Annotated[
        tuple[HostName, ...], _LIST, AfterValidator(_unique), Wording("a list of host names")
    ] = ()


class PollingConfig(Section):
    """When each ingestion id is polled, retried and forgotten."""

    interval_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    jitter_ratio: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    terminal_retention_seconds: Annotated[float, Field(ge=0)] = 86400.0
    invalid_retry_seconds: Annotated[float, Field(gt=0)] = 3600.0
    initial_backoff_seconds: Annotated[float, Field(gt=0)] = 1.0
    max_backoff_seconds: Annotated[float, Field(gt=0)] = 300.0
    # None: terminal_retention_seconds for DONE too
    done_retention_seconds: Annotated[float | None, Field(ge=0)] = None

    @model_validator(mode="after")
    def _backoff_grows(self) -> PollingConfig:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise refusal(
                type(self).__name__,
                self,
                [
                    (
                        ("max_backoff_seconds",),
                        "expected a number >= {here}.initial_backoff_seconds "
                        f"({fmt(self.initial_backoff_seconds)}), "
                        f"got {fmt(self.max_backoff_seconds)}",
                    )
                ],
            )
        return self

    def retention_for(self, status: str) -> float:
        """How long a terminal upload's series are kept: DONE may have its own, shorter one."""
        if status == "DONE" and self.done_retention_seconds is not None:
            return self.done_retention_seconds
        return self.terminal_retention_seconds


class IngestionsConfig(Section):
    """Which uploads are tracked, and what is attached to their metrics.

    `ids` and `labels` have duplicates removed, in the order first listed. `directory` is
    where the app drops one file per upload ("" disables it); it may not exist yet.
    `max_tracked` caps the ids tracked from every source together.
    """

    ids: Annotated[
        tuple[IngestionId, ...],
        _LIST,
        AfterValidator(_unique),
        Wording("a list of ingestion ids"),
    ] = ()
    directory: Annotated[str, _checked(_directory_problem)] = ""
    directory_poll_seconds: Annotated[float, Field(gt=0, le=3600)] = 2.0
    # watch: a file present means tracked; spool: files are consumed (needs state.path).
    directory_mode: Annotated[DirectoryMode, _CHOICE] = "watch"
    # The volume's sizeLimit, for the directory-filling alert (0: not known).
    directory_size_limit_bytes: Annotated[int, Field(ge=0, le=2**50), _INTEGRAL] = 0
    max_tracked: Annotated[int, Field(ge=1, le=10_000_000), _INTEGRAL] = 100_000
    labels: Annotated[
        tuple[LabelName, ...],
        _LIST,
        AfterValidator(_unique),
        AfterValidator(_at_most_labels),
        Wording("a list of label names"),
    ] = ()

    @model_validator(mode="after")
    def _ids_fit(self) -> IngestionsConfig:
        if len(self.ids) > self.max_tracked:
            raise refusal(
                type(self).__name__,
                self,
                [(("ids",), f"{len(self.ids)} ids exceed {{here}}.max_tracked {self.max_tracked}")],
            )
        return self


class ServerConfig(Section):
    """Where the metrics endpoint listens (port 0 picks a free port), and how long clients may
    dawdle: idle or half-sent requests are closed after `idle_timeout_seconds`, a scrape not
    read within `write_timeout_seconds` is dropped (so stalled clients cannot pile up bodies).
    """

    host: str = "0.0.0.0"  # noqa: S104 - an exporter in a container must listen on all interfaces
    port: ListenPort = DEFAULT_PORT
    idle_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 75.0
    write_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # exporter-toolkit's web config (TLS, basic auth, headers), read at start by `webconfig`
    # and watched for rotation; "" serves plain HTTP. `--web.config.file` wins over it.
    web_config_file: str = ""

    @field_validator("host")
    @classmethod
    def _host_usable(cls, host: str) -> str:
        return _listen_host(cls, host)


class LoggingConfig(Section):
    """Log level (debug, info, warning, error) and format (json, console), lower-case."""

    level: Annotated[LogLevel, _CHOICE] = "info"
    format: Annotated[LogFormat, _CHOICE] = "json"


class MetricsConfig(Section):
    """How many series each upload costs: `all` (one-hot, seven status series) or `active`."""

    status_series: Annotated[StatusSeries, _CHOICE] = "all"


class ReloadConfig(Section):
    """How often the config file is checked for changes; 0 leaves only SIGHUP."""

    watch_interval_seconds: Annotated[float, Field(ge=0)] = 5.0


class AdminConfig(Section):
    """The admin HTTP API (register, list and delete ids) on its own listener.

    Loopback by default: in a sidecar the app reaches it on localhost. With `token_file` set
    each request needs "Authorization: Bearer <token>"; the token is read by the server, never
    kept here. Without a listener (`enabled: false`) the port and token file are not checked.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: ListenPort = DEFAULT_ADMIN_PORT
    token_file: Annotated[str, SECRET] = ""
    #: Host names (besides loopback ones) a request may name in its Host header.
    allowed_hosts: Annotated[
        tuple[HostName, ...], _LIST, AfterValidator(_unique), Wording("a list of host names")
    ] = ()

    @field_validator("host")
    @classmethod
    def _host_usable(cls, host: str) -> str:
        return _listen_host(cls, host)

    @field_validator("port")
    @classmethod
    def _port_free(cls, port: int, info: ValidationInfo) -> int:
        """Equal ports are refused whatever the hosts: 0.0.0.0 overlaps every address, and
        telling which names resolve to the same address is not a load-time question."""
        server = _validated(info, "server")
        if info.data.get("enabled") is True and server is not None and port == server.port != 0:
            raise _problem(f"must differ from server.port ({server.port})")
        return port

    @model_validator(mode="after")
    def _open_only_with_a_token(self) -> AdminConfig:
        """Off loopback, anyone who can reach the listener could register and delete ids."""
        if self.enabled and not self.token_file and not is_loopback_host(self.host):
            raise refusal(
                type(self).__name__,
                self,
                [
                    (
                        ("host",),
                        f"{self.host!r} is not a loopback address (127.0.0.1, ::1, localhost): "
                        "anyone who can reach it could register and delete ids; set "
                        "{here}.token_file too",
                    )
                ],
            )
        return self


class ProxyConfig(Section):
    """The signing proxy (docs/proxy.md): the app sends its Catalog API calls here unsigned.

    Off by default. It signs with the pod's credentials, so it listens on loopback only: a
    proxy anyone could reach would lend them our IAM role. `max_body_bytes` is buffered in
    full before signing (SigV4 signs the payload's hash).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: ListenPort = DEFAULT_PROXY_PORT
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024), _INTEGRAL] = (
        DEFAULT_PROXY_MAX_BODY_BYTES
    )

    @field_validator("host")
    @classmethod
    def _host_usable(cls, host: str) -> str:
        host = _listen_host(cls, host)
        if not is_loopback_host(host):
            raise _problem(
                f"{host!r} is not a loopback address (127.0.0.1, ::1, localhost): the proxy "
                "signs with the exporter's credentials, so whoever reaches it could use them"
            )
        return host

    @field_validator("port")
    @classmethod
    def _port_free(cls, port: int, info: ValidationInfo) -> int:
        """Its own port: not the metrics listener's nor the admin API's."""
        if info.data.get("enabled") is not True or port == 0:
            return port
        server, admin = _validated(info, "server"), _validated(info, "admin")
        if server is not None and port == server.port:
            raise _problem(f"must differ from server.port ({server.port})")
        if admin is not None and admin.enabled and port == admin.port:
            raise _problem(f"must differ from admin.port ({admin.port})")
        return port


class StateConfig(Section):
    """Where tracked ids and their state survive restarts ("" disables), and write coalescing."""

    # What is beside the path (its directory, the config's other files) is config_preflight's.

    path: str = ""
    debounce_seconds: Annotated[float, Field(ge=0, le=60)] = 0.5

    @field_validator("path")
    @classmethod
    def _path_usable(cls, path: str, info: ValidationInfo) -> str:
        if not path:
            return path
        ingestions = _validated(info, "ingestions")
        directory = ingestions.directory if ingestions is not None else ""
        problem = absolute_path_problem(path)
        if problem is None and directory and is_within(path, directory):
            # The app drops one file per upload there: the state file would be read as one.
            problem = f"must be outside ingestions.directory ({directory!r})"
        if problem is None and path.endswith("/"):
            problem = f"expected a file name after the last '/', got {path!r}"
        if problem:
            raise _problem(problem)
        return path


class ShardingConfig(Section):
    """This replica's share of the ids: those `exporter.sharding.shard_of` maps to `index`.

    `index` is resolved at load time: the file's value, else the StatefulSet ordinal at the
    end of the hostname ("name-3" -> 3) when `total` > 1, else 0.
    """

    total: Annotated[int, Field(ge=1, le=_MAX_SHARDS), _INTEGRAL] = 1
    index: Annotated[
        int,
        Field(ge=0, le=_MAX_SHARDS - 1),
        _INTEGRAL,
        # null, the documented default, asks for the hostname's ordinal.
        Field(json_schema_extra={"default": None}),
    ] = 0

    @model_validator(mode="after")
    def _index_below_total(self) -> ShardingConfig:
        """An index given must be below total; a null (unset) one is `config_preflight`'s."""
        if "index" in self.model_fields_set and self.index >= self.total:
            raise refusal(
                type(self).__name__,
                self,
                [
                    (
                        ("index",),
                        f"expected an integer from 0 to {self.total - 1} "
                        f"(below {{here}}.total {self.total}), got {self.index}",
                    )
                ],
            )
        return self


_OPTIONAL_URL_SCHEMA = Field(json_schema_extra={"pattern": "^(https?://[^?#@ ]+)?$"})


class SqsConfig(Section):
    """An SQS queue of upload-result notifications, used as poll triggers ("" queue_url: off).

    `region` is resolved at load time: the file's, else the queue URL's
    (sqs.<region>.amazonaws.com), else AWS_REGION / AWS_DEFAULT_REGION. `endpoint_url`
    replaces the regional endpoint (LocalStack, moto, a VPC endpoint). Credentials come from
    the AWS default chain, never from here.
    """

    queue_url: Annotated[
        str, _checked(lambda url: _base_url_problem(url) if url else None), _OPTIONAL_URL_SCHEMA
    ] = ""
    # Resolved even when absent; never quoted, like api.auth.region: an access key pasted here
    # must not be echoed.
    region: Annotated[str, SECRET, Field(validate_default=True)] = ""
    endpoint_url: Annotated[
        str, AfterValidator(lambda url: _base_url(url) if url else url), _OPTIONAL_URL_SCHEMA
    ] = ""
    register_unknown: bool = False
    # SQS's own limits: long polls of at most 20 s, batches of at most 10.
    wait_seconds: Annotated[int, Field(ge=0, le=20), _INTEGRAL] = 20
    max_messages: Annotated[int, Field(ge=1, le=10), _INTEGRAL] = 10
    confirm_subscriptions: bool = False
    max_backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # Ids register_unknown may track at once (None: a tenth of ingestions.max_tracked); below
    # max_tracked, so the config, the directory and the admin API always have room.
    max_registered: Annotated[int | None, Field(ge=1, le=10_000_000), _INTEGRAL] = None
    # How long an id registered by a notification stays tracked once the API calls it INVALID.
    invalid_retention_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0

    @field_validator("max_registered")
    @classmethod
    def _below_max_tracked(cls, cap: int | None, info: ValidationInfo) -> int | None:
        ingestions = _validated(info, "ingestions")
        if cap is not None and ingestions is not None and cap >= ingestions.max_tracked:
            raise _problem(
                f"expected a number below ingestions.max_tracked ({ingestions.max_tracked}), "
                f"got {cap}: the other sources need room"
            )
        return cap

    def registration_cap(self, max_tracked: int) -> int:
        """How many ids notifications may hold at once, given ingestions.max_tracked."""
        if self.max_registered is not None:
            return min(self.max_registered, max(0, max_tracked - 1))
        return max_tracked // 10

    @field_validator("region")
    @classmethod
    def _region_from_queue_url(cls, region: str, info: ValidationInfo) -> str:
        """With a queue, the file's region, else the queue URL's; else the environment's,
        which `config_preflight` reads (or says is missing).

        A field validator (queue_url is checked before it), so that a bad region is reported
        beside the section's other problems.
        """
        queue_url = info.data.get("queue_url", "")
        if not queue_url:
            return region  # off, or a bad queue_url already reported: no region needed
        if not region:
            host = urllib.parse.urlsplit(queue_url).hostname or ""
            found = _SQS_HOST_REGION.fullmatch(host)
            return (found.group(1) or found.group(2)) if found else ""
        if not REGION.fullmatch(region):
            raise _problem(
                f"expected an AWS region such as us-east-1, got {describe(region, secret=True)}"
            )
        return region


class NotificationsConfig(Section):
    """Where upload-result notifications come from (only SQS so far)."""

    sqs: SqsConfig = _SECTION_DEFAULT


class Config(Section):
    """The whole validated configuration."""

    model_config = ConfigDict(
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "catalog-upload-exporter configuration",
            "description": "Generated by `catalog-upload-exporter schema`; see "
            "config.example.yaml for what each key means.",
        }
    )

    api: ApiConfig
    polling: PollingConfig = _SECTION_DEFAULT
    ingestions: IngestionsConfig = _SECTION_DEFAULT
    server: ServerConfig = _SECTION_DEFAULT
    logging: LoggingConfig = _SECTION_DEFAULT
    metrics: MetricsConfig = _SECTION_DEFAULT
    reload: ReloadConfig = _SECTION_DEFAULT
    admin: AdminConfig = _SECTION_DEFAULT
    state: StateConfig = _SECTION_DEFAULT
    sharding: ShardingConfig = _SECTION_DEFAULT
    notifications: NotificationsConfig = _SECTION_DEFAULT
    proxy: ProxyConfig = _SECTION_DEFAULT

    @model_validator(mode="after")
    def _spool_is_persisted(self) -> Config:
        """Spool mode deletes a file once its id is in the state: it needs a state."""
        ingestions = self.ingestions
        if ingestions.directory and ingestions.directory_mode == "spool" and not self.state.path:
            message = (
                "spool needs state.path: a consumed file's id is kept only in the state "
                '(set state.path, or directory_mode: "watch")'
            )
            raise refusal(type(self).__name__, self, [(("ingestions", "directory_mode"), message)])
        return self

    @model_validator(mode="before")
    @classmethod
    def _api_is_required(cls, data: Any) -> Any:
        """A missing api section is reported as its one required key."""
        if isinstance(data, dict) and data.get("api") is None:
            return {**data, "api": {}}
        return data

    @field_validator("*")
    @classmethod
    def _remember(cls, section: Any, info: ValidationInfo) -> Any:
        """Keep a valid section for the checks of later ones (admin.port, state.path) and for
        the pre-flight of a document with problems elsewhere."""
        if isinstance(info.context, _Document) and info.field_name is not None:
            info.context.validated[info.field_name] = section
        return section


def validate_section(name: str, data: object, validated: dict[str, Any]) -> Any | None:
    """One section of the document alone, checked against the sections `validated` (the
    checks across sections); None when it is refused (the document's problems say why)."""
    model = Config.model_fields[name].annotation
    if not isinstance(model, type) or not issubclass(model, Section):
        return None  # not a section
    try:
        return model.model_validate(data, context=_Document(dict(validated)))
    except ValidationError:
        return None


def validate_document(data: object) -> tuple[Config | None, list[ErrorDetails], dict[str, Any]]:
    """Validate a parsed document: the Config, or pydantic's error details and the sections
    (by name) that were valid, which the pre-flight still checks."""
    document = _Document()
    try:
        return Config.model_validate(data, context=document), [], document.validated
    except ValidationError as error:
        return None, error.errors(include_url=False), document.validated
