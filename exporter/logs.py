"""Logging set-up: structlog JSON lines (or console rendering) on stdout, in one place.

Standard-library loggers (aiohttp, botocore) are routed through the same renderer so stdout
stays one JSON object per line. botocore is held at WARNING whatever the level: at DEBUG it
logs canonical requests and SigV4 signatures, which must never reach a log. A `SecretMask`
masks, in every line, each secret the process holds at that moment.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO, get_args

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from exporter.auth import silence_botocore_debug

#: The log levels (`logging.level`): the one list of the choices, which config takes from here.
LogLevel = Literal["debug", "info", "warning", "error"]
#: Each level's standard-library number.
LEVELS: dict[str, int] = {
    name: logging.getLevelNamesMapping()[name.upper()] for name in get_args(LogLevel)
}
#: The log formats (`logging.format`): JSON lines, or console rendering for people.
LogFormat = Literal["json", "console"]


#: What a masked secret is replaced with.
MASKED = "<secret>"

SecretSource = Callable[[], Iterable[str]]


class SecretMask:
    """A structlog processor replacing every secret the process holds by `<secret>`.

    Each part that holds a secret (the API authenticator: bearer token, AWS secret key and
    session token; the admin API: its token) is watched through a source: a callable that
    returns what it holds now, so a rotated token file, refreshed credentials or a reloaded
    config are masked from the first line logged after the change. The sources are read on
    each line (attribute reads) and the pattern is recompiled only when their answer changed;
    with no secret held, a line costs one empty tuple.

    Every value is masked, nested ones and the event text included. A secret is matched
    verbatim, JSON-escaped, and with any of its characters other than ASCII letters and
    digits percent-encoded (upper- or lower-case hex; all, some or none of them). Short
    secrets are masked too, whatever their length: masking a coincidental "abc" in a line
    is a lesser harm than printing a weak token (docs/security.md says so).

    structlog's configuration is process-wide, so this is one object made at start-up and
    passed to `configure_logging`, to `Exporter` and for the admin API; no module state.
    """

    def __init__(self) -> None:
        # Both attributes are swapped whole, never changed in place: threads (stdlib loggers)
        # may iterate the sources while `watch` adds one.
        self._sources: Mapping[str, SecretSource] = {}
        self._compiled: tuple[tuple[str, ...], re.Pattern[str] | None] = ((), None)

    def watch(self, name: str, source: SecretSource) -> None:
        """Mask what `source` returns from now on (replacing the source of that name)."""
        self._sources = {**self._sources, name: source}

    def mask(self, text: str) -> str:
        """`text` with every secret held now replaced by `<secret>`."""
        pattern = self._pattern()
        return text if pattern is None else pattern.sub(MASKED, text)

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """The processor: every key and value of the event, masked."""
        pattern = self._pattern()
        if pattern is None:
            return event_dict
        return {_masked(k, pattern): _masked(v, pattern) for k, v in event_dict.items()}

    def _pattern(self) -> re.Pattern[str] | None:
        held = tuple(sorted({s for source in self._sources.values() for s in source() if s}))
        compiled = self._compiled
        if held != compiled[0]:
            compiled = (held, _compile(held))
            self._compiled = compiled
        return compiled[1]


def _compile(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One alternation of every secret's forms, longest secret first (a secret containing
    another is masked whole)."""
    if not secrets:
        return None
    ordered = sorted(secrets, key=len, reverse=True)
    return re.compile("|".join("".join(map(_character, s)) for s in ordered))


def _character(character: str) -> str:
    """A pattern for one character of a secret: itself, or (other than an ASCII letter or
    digit) its JSON escape or its UTF-8 bytes percent-encoded in either case of hex."""
    if character.isascii() and character.isalnum():
        return character
    encoded = "".join(
        "%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{byte:02X}")
        for byte in character.encode("utf-8", "surrogatepass")
    )
    escaped = json.dumps(character)[1:-1]
    forms = dict.fromkeys([encoded, re.escape(escaped), re.escape(character)])
    if character == "/":
        forms[re.escape("\\/")] = None  # JSON may escape "/" too
    return "(?:" + "|".join(forms) + ")"


def _masked(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(MASKED, value)
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, dict):
        return {_masked(k, pattern): _masked(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(_masked(v, pattern) for v in value)
    # Anything else is rendered by its repr (JSONRenderer's fallback): replaced by the masked
    # repr only when that holds a secret, so ordinary objects render as before.
    text = repr(value)
    return pattern.sub(MASKED, text) if pattern.search(text) else value


class ClientFaultFilter(logging.Filter):
    """Turn aiohttp's tracebacks for a client's own fault into one warning line.

    A request line or header over aiohttp's limits, or a scraper that hangs up mid-body, is
    logged by aiohttp.server at error level with a traceback; it is the peer's doing, not a
    fault of ours, so it becomes a warning naming the exception's class only (its text may
    quote the hostile request).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place when its exception is the client's fault."""
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | ConnectionError):
            record.msg = f"client_request_refused: {type(error).__name__}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    mask: SecretMask | None = None,
) -> None:
    """(Re)configure structlog and the standard library; safe to call again on reload.

    With `mask`, every line (structlog's and the standard library's) goes through it last,
    just before rendering, after exceptions were formatted.
    """
    out = stream if stream is not None else sys.stdout
    masking: list[Any] = [] if mask is None else [mask]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            *masking,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.addFilter(ClientFaultFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # A real fault's traceback is worth having; the client's own faults were
                # turned into one warning line by ClientFaultFilter before this.
                structlog.processors.format_exc_info,
                *masking,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.INFO))
    silence_botocore_debug()
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
