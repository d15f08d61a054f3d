"""The configuration file: read, validated, checked against its surroundings, in one step.

`load_config` reads the file (`yamlfile`: bounded, no repeated keys), `config_models`
validates the document (pure: the document alone), and `config_preflight` checks what the
valid sections need from the filesystem and the environment and fills in what they leave
to it (regions, the shard index). Every problem of the three is reported at once in one
`ConfigError`, one line per key path in our own words (`config_wording`), in the order of
the keys. The models are re-exported here: the rest of the exporter imports its config
from this module.

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

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from exporter.config_models import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_PORT,
    AdminConfig,
    ApiConfig,
    AuthConfig,
    Config,
    IngestionsConfig,
    LoggingConfig,
    MetricsConfig,
    NotificationsConfig,
    PollingConfig,
    ProxyConfig,
    ReloadConfig,
    ServerConfig,
    ShardingConfig,
    SqsConfig,
    StateConfig,
    is_loopback_host,
    validate_document,
    validate_section,
)
from exporter.config_preflight import READS, Surroundings, preflight
from exporter.config_wording import TOP_LEVEL, describe, problem_line
from exporter.yamlfile import YamlFileError, read_yaml

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_PORT",
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
    "ProxyConfig",
    "ReloadConfig",
    "ServerConfig",
    "ShardingConfig",
    "SqsConfig",
    "StateConfig",
    "is_loopback_host",
    "load_config",
    "parse_config",
]


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


def parse_config(
    data: object,
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    config_path: str | os.PathLike[str] = "",
    token_files_may_be_absent: bool = False,
) -> Config:
    """Validate an already-parsed YAML document, then pre-flight it.

    `environ` defaults to os.environ. `hostname` is read only to resolve a null
    sharding.index; it defaults to environ["HOSTNAME"] (Kubernetes sets it to the pod name),
    else socket.gethostname(). `config_path` is the file the document came from: state.path
    must not name it. With `token_files_may_be_absent` a token file that does not exist is
    not a problem (`--on-invalid-config=serve`: it may be mounted later).
    """
    if data is None:
        raise ConfigError(
            [f"{TOP_LEVEL}: the document is empty; at least api.base_url is required"]
        )
    if not isinstance(data, dict):
        # Not quoted: a token file given as --config by mistake must not be printed.
        shown = describe(data, secret=True)
        raise ConfigError([f"{TOP_LEVEL}: expected a mapping of sections, got {shown}"])
    config, details, valid = validate_document(data)
    sections: dict[str, Any] = dict(config) if config is not None else dict(valid)
    for name, keys in READS.items():
        if name not in sections and isinstance(data.get(name), dict):
            section = validate_section(name, _picked(data[name], keys), valid)
            if section is not None:
                sections[name] = section
    surroundings = Surroundings.of(
        environ, hostname, config_path, token_files_may_be_absent=token_files_may_be_absent
    )
    found = preflight(sections, surroundings)
    problems: list[Mapping[str, Any]] = list(details)
    problems.extend(
        {"loc": f.loc, "type": "config", "input": f.value, "ctx": {"message": f.message}}
        for f in found.problems
    )
    if problems or config is None:
        problems.sort(key=lambda detail: _key_order(Config, detail["loc"]))
        raise ConfigError(problem_line(Config, detail) for detail in problems)
    return config.model_copy(update=found.resolved)


def _picked(mapping: dict[Any, Any], paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """Only the keys at `paths` of a mapping (nested mappings kept as mappings)."""
    picked: dict[str, Any] = {}
    for path in paths:
        source: object = mapping
        target = picked
        for depth, key in enumerate(path):
            if not isinstance(source, dict) or key not in source:
                break
            if depth == len(path) - 1:
                target[key] = source[key]
            else:
                source = source[key]
                target = target.setdefault(key, {})
    return picked


def _key_order(model: type[BaseModel] | None, loc: Sequence[str | int]) -> tuple[int, ...]:
    """Where a key path comes in the document's declared order (list items by index, an
    unknown key after the known ones), so that every problem is listed in one order."""
    order: list[int] = []
    for part in loc:
        if isinstance(part, int):
            order.append(part)
            continue
        names = list(model.model_fields) if model is not None else []
        order.append(names.index(part) if part in names else len(names))
        field = model.model_fields.get(part) if model is not None else None
        kind = field.annotation if field is not None else None
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return tuple(order)


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    token_files_may_be_absent: bool = False,
) -> Config:
    """Read (`yamlfile.read_yaml`: bounded, no repeated keys), validate and pre-flight.

    Every failure is a ConfigError. `environ`, `hostname` and `token_files_may_be_absent` are
    as for `parse_config`.
    """
    try:
        data = read_yaml(path)
    except YamlFileError as error:
        raise ConfigError(error.problems) from None
    if data is None:
        name = os.fspath(path)
        raise ConfigError([f"{name}: the file is empty; at least api.base_url is required"])
    return parse_config(
        data,
        environ=environ,
        hostname=hostname,
        config_path=path,
        token_files_may_be_absent=token_files_may_be_absent,
    )
