"""Tests for exporter.config: the example file, defaults, and every way a config is refused."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from exporter.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_PORT,
    AdminConfig,
    ApiConfig,
    AuthConfig,
    Config,
    ConfigError,
    IngestionsConfig,
    LoggingConfig,
    NotificationsConfig,
    PollingConfig,
    ProxyConfig,
    ReloadConfig,
    ServerConfig,
    ShardingConfig,
    SqsConfig,
    StateConfig,
    load_config,
    parse_config,
)
from exporter.config_models import validate_document
from exporter.secretfile import MAX_SECRET_BYTES
from exporter.yamlfile import MAX_CONFIG_BYTES

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
REGION_ENV = {"AWS_REGION": "eu-west-1"}
BASE_URL = "https://api.example.com/prod"
SECRET = "s3cr3t-T0ken-value-never-shown"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the documented default listen address, not a bind


def minimal(**sections: object) -> dict[str, object]:
    """A valid document (only api.base_url) with `sections` merged in at the top level."""
    return {"api": {"base_url": BASE_URL}, **sections}


def with_api(**keys: object) -> dict[str, object]:
    """A valid document with `keys` added to the api section."""
    return {"api": {"base_url": BASE_URL, **keys}}


def problems_of(data: object, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The problems parse_config reports for `data`; fails the test when it accepts it."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ=REGION_ENV if environ is None else environ)
    return caught.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(SECRET, encoding="utf-8")
    return path


# The example file


def test_example_config_loads_with_the_values_it_documents():
    """config.example.yaml is valid and every key holds the default its comment states."""
    config = load_config(EXAMPLE, environ={})

    assert config.api.base_url == "https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com/prod"
    assert config.api.auth == AuthConfig(type="sigv4", region="us-east-1")
    assert config.api.timeout_seconds == 10.0
    assert config.api.max_requests_per_second == 5.0
    assert config.api.max_concurrency == 4
    assert config.api.max_response_bytes == 1048576
    assert config.polling == PollingConfig()
    assert config.ingestions.ids == (
        "a1b2c3d4-0000-4000-8000-000000000001",
        "a1b2c3d4-0000-4000-8000-000000000002",
    )
    assert config.ingestions.directory == ""
    assert config.ingestions.directory_poll_seconds == 2.0
    assert config.ingestions.max_tracked == 100000
    assert config.ingestions.labels == ()
    assert config.server == ServerConfig(host=ALL_INTERFACES, port=10184)
    assert config.logging == LoggingConfig(level="info", format="json")
    assert config.reload == ReloadConfig(watch_interval_seconds=5.0)
    assert config.admin == AdminConfig(enabled=True, host="127.0.0.1", port=10185, token_file="")
    assert config.state == StateConfig(path="", debounce_seconds=0.5)
    assert config.sharding == ShardingConfig(total=1, index=0)
    assert config.notifications == NotificationsConfig(sqs=SqsConfig())
    assert config.proxy == ProxyConfig(enabled=False, host="127.0.0.1", port=10186)


def test_example_config_without_its_region_takes_aws_region_from_the_environment(tmp_path):
    """With the example's region line removed, AWS_REGION supplies the signing region (on a
    host name that carries none: an execute-api host's region comes first)."""
    text = EXAMPLE.read_text(encoding="utf-8").replace("region: us-east-1", "region: ''")
    assert "region: ''" in text
    text = text.replace(".execute-api.us-east-1.amazonaws.com", ".catalog.example.com")

    config = load_config(write(tmp_path, text), environ={"AWS_REGION": "ap-southeast-2"})

    assert config.api.auth.region == "ap-southeast-2"


def test_example_config_bearer_alternative_loads_when_uncommented(tmp_path):
    """Switching the example to its commented bearer lines (token_env variant) is valid."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("    type: sigv4\n", "    type: bearer\n")
    text = text.replace("    # token_env: CATALOG_API_TOKEN", "    token_env: CATALOG_API_TOKEN")

    config = load_config(write(tmp_path, text), environ={"CATALOG_API_TOKEN": SECRET})

    assert config.api.auth.type == "bearer"
    assert config.api.auth.token_env == "CATALOG_API_TOKEN"


def test_example_config_directory_and_labels_alternatives_load_when_uncommented(tmp_path):
    """The example's commented directory and labels lines are valid when swapped in."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('  directory: ""\n  # directory:', "  # directory: ''\n  directory:")
    text = text.replace("  labels: []\n  # labels:", "  # labels: []\n  labels:")

    config = load_config(write(tmp_path, text), environ={})

    assert config.ingestions.directory == "/var/run/catalog-uploads"
    assert config.ingestions.labels == ("catalog", "marketplace", "team")


# Defaults


def test_minimal_config_gets_every_default():
    """A document with only api.base_url gets the documented default for every other key."""
    config = parse_config({"api": {"base_url": BASE_URL}}, environ=REGION_ENV)

    assert config == Config(
        api=ApiConfig(
            base_url=BASE_URL,
            auth=AuthConfig(
                type="sigv4",
                region="eu-west-1",
                role_arn="",
                token_file="",
                token_env="",
                header="Authorization",
                scheme="Bearer",
            ),
            timeout_seconds=10.0,
            max_requests_per_second=5.0,
            max_concurrency=4,
            max_response_bytes=1048576,
        ),
        polling=PollingConfig(
            interval_seconds=60.0,
            jitter_ratio=0.1,
            terminal_retention_seconds=86400.0,
            invalid_retry_seconds=3600.0,
            initial_backoff_seconds=1.0,
            max_backoff_seconds=300.0,
        ),
        ingestions=IngestionsConfig(
            ids=(), directory="", directory_poll_seconds=2.0, max_tracked=100_000, labels=()
        ),
        server=ServerConfig(host=ALL_INTERFACES, port=DEFAULT_PORT),
        logging=LoggingConfig(level="info", format="json"),
        reload=ReloadConfig(watch_interval_seconds=5.0),
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=DEFAULT_ADMIN_PORT, token_file=""),
        state=StateConfig(path="", debounce_seconds=0.5),
        sharding=ShardingConfig(total=1, index=0),
    )


def test_the_docs_state_the_default_ports_the_code_uses():
    """The README and the configuration reference name the ports the config defaults to."""
    readme = Path("README.md").read_text(encoding="utf-8")
    reference = Path("docs/configuration.md").read_text(encoding="utf-8")
    ports = f"on port {DEFAULT_PORT}, the admin API on 127.0.0.1:{DEFAULT_ADMIN_PORT}."
    assert f"`/metrics` listens {ports}" in readme
    assert f"| `server.host` / `server.port` | `0.0.0.0` / {DEFAULT_PORT} |" in reference
    assert f"| `admin.host` / `admin.port` | `127.0.0.1` / {DEFAULT_ADMIN_PORT} |" in reference


def test_null_sections_and_null_keys_mean_defaults():
    """`polling:` left empty (null) and `interval_seconds: null` both give the defaults."""
    config = parse_config(
        minimal(polling=None, server={"port": None}, ingestions={"ids": None}), environ=REGION_ENV
    )

    assert config.polling == PollingConfig()
    assert config.server.port == DEFAULT_PORT
    assert config.ingestions.ids == ()


def test_null_admin_and_state_sections_and_keys_mean_defaults():
    """`admin:` left empty and `state: {path: null, ...}` give the defaults."""
    config = parse_config(
        minimal(
            admin=None,
            state={"path": None, "debounce_seconds": None},
            ingestions={"directory": None, "labels": None, "max_tracked": None},
        ),
        environ=REGION_ENV,
    )

    assert config.admin == AdminConfig()
    assert config.state == StateConfig()
    assert config.ingestions == IngestionsConfig()


def test_values_given_are_kept_and_ints_become_floats():
    """Given values replace defaults; an int where a float is expected is stored as a float."""
    config = parse_config(
        minimal(polling={"interval_seconds": 15, "jitter_ratio": 0.25}), environ=REGION_ENV
    )

    assert config.polling.interval_seconds == 15.0
    assert isinstance(config.polling.interval_seconds, float)
    assert config.polling.jitter_ratio == 0.25


def test_config_objects_are_frozen():
    """A loaded config cannot be changed in place."""
    config = parse_config(minimal(), environ=REGION_ENV)

    with pytest.raises(ValidationError, match="frozen"):
        config.polling.interval_seconds = 1.0  # type: ignore[misc]
    assert config.polling.interval_seconds == 60.0


# Reporting


def test_every_problem_is_reported_together_each_naming_its_path():
    """Four bad keys in four sections give four problems, one per key path."""
    data = {
        "api": {"base_url": BASE_URL, "timeout_seconds": "abc"},
        "polling": {"interval_seconds": -1},
        "server": {"port": 70000},
        "logging": {"level": "loud"},
    }

    problems = problems_of(data)

    assert len(problems) == 4
    assert [p.split(":", 1)[0] for p in problems] == [
        "api.timeout_seconds",
        "polling.interval_seconds",
        "server.port",
        "logging.level",
    ]
    assert "api.timeout_seconds: expected a number > 0 and <= 300, got 'abc'" in problems


def test_config_error_str_joins_the_problems_one_per_line():
    """str(ConfigError) is its problems joined by newlines, and it survives pickling."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            minimal(polling={"interval_seconds": 0}, server={"port": -1}), environ=REGION_ENV
        )
    error = caught.value

    assert str(error) == "\n".join(error.problems)
    assert len(error.problems) == 2
    # Our own exception, pickled as multiprocessing or a logging queue would.
    assert pickle.loads(pickle.dumps(error)).problems == error.problems  # noqa: S301


def test_unknown_key_is_reported_with_the_closest_known_key():
    """A misspelt key is an error that suggests the key it most resembles."""
    problems = problems_of(minimal(polling={"intervall_seconds": 30}))

    assert problems == ("polling.intervall_seconds: unknown key; did you mean 'interval_seconds'?",)


def test_unknown_key_without_a_close_match_has_no_suggestion():
    """An unknown key nothing resembles is reported without a guess."""
    problems = problems_of({"api": {"base_url": BASE_URL, "auth": {"zzz": 1}}})

    assert problems == ("api.auth.zzz: unknown key",)


def test_unknown_section_is_reported():
    """A top-level key that is not a section is an error, with a suggestion."""
    problems = problems_of(minimal(ingestion={"ids": ["a"]}))

    assert problems == ("ingestion: unknown key; did you mean 'ingestions'?",)


def test_an_unknown_key_not_shaped_like_ours_is_not_shown_but_still_gets_a_suggestion():
    """A mixed-case or digit-bearing key name may be a pasted token: only its length is
    shown, and "did you mean" still helps with a mis-cased key."""
    problems = problems_of(with_api(baseURL="x", AKIAIOSFODNN7EXAMPLE="y"), environ=REGION_ENV)

    assert problems == (
        "api.<a key of 7 characters, not shown>: unknown key; did you mean 'base_url'?",
        "api.<a key of 20 characters, not shown>: unknown key",
    )


def test_section_that_is_not_a_mapping_is_one_problem_without_follow_on_noise():
    """`auth: sigv4` is reported once, on api.auth, not also as a missing region."""
    problems = problems_of({"api": {"base_url": BASE_URL, "auth": "sigv4"}}, environ={})

    assert problems == ("api.auth: expected a mapping, got a string of 5 characters (not shown)",)


def test_missing_api_section_reports_base_url_as_required():
    """A document without api says api.base_url is required."""
    problems = problems_of({"polling": {"interval_seconds": 5}})

    assert problems == ("api.base_url: required",)


# Types and ranges


def test_bool_is_rejected_where_a_number_is_expected(tmp_path):
    """YAML `yes` is a bool, and a bool is not accepted as a number or an integer."""
    path = write(
        tmp_path,
        f"api:\n  base_url: {BASE_URL}\n  max_concurrency: yes\npolling:\n  interval_seconds: on\n",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert [p.split(":", 1)[0] for p in caught.value.problems] == [
        "api.max_concurrency",
        "polling.interval_seconds",
    ]
    assert all("got true" in p for p in caught.value.problems)


def test_quoted_number_is_rejected_not_coerced():
    """A number written as a string is an error with a hint, not silently converted."""
    problems = problems_of(minimal(polling={"interval_seconds": "60"}))

    assert len(problems) == 1
    assert problems[0].startswith("polling.interval_seconds: expected a number > 0")
    assert "got '60'" in problems[0]
    assert "a string to YAML" in problems[0]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("api", "timeout_seconds", 0),
        ("api", "timeout_seconds", 300.5),
        ("api", "max_requests_per_second", 0),
        ("api", "max_requests_per_second", 10001),
        ("api", "max_concurrency", 0),
        ("api", "max_concurrency", 257),
        ("api", "max_response_bytes", 1023),
        ("api", "max_response_bytes", 64 * 1024 * 1024 + 1),
        ("polling", "interval_seconds", 0),
        ("polling", "interval_seconds", 86401),
        ("polling", "jitter_ratio", -0.1),
        ("polling", "jitter_ratio", 0.51),
        ("polling", "terminal_retention_seconds", -1),
        ("polling", "invalid_retry_seconds", 0),
        ("polling", "initial_backoff_seconds", 0),
        ("polling", "max_backoff_seconds", -5),
        ("server", "port", -1),
        ("server", "port", 65536),
        ("reload", "watch_interval_seconds", -0.5),
        ("ingestions", "directory_poll_seconds", 0),
        ("ingestions", "directory_poll_seconds", 3600.5),
        ("ingestions", "max_tracked", 0),
        ("ingestions", "max_tracked", 10_000_001),
        ("ingestions", "max_tracked", 2.5),
        ("admin", "port", -1),
        ("admin", "port", 65536),
        ("state", "debounce_seconds", -0.1),
        ("state", "debounce_seconds", 60.5),
        ("sharding", "total", 0),
        ("sharding", "total", 1025),
        ("sharding", "total", 2.5),
        ("sharding", "index", -1),
        ("sharding", "index", 1024),
    ],
)
def test_out_of_range_value_is_reported_on_its_key(section, key, value):
    """A number outside its documented range is one problem naming the key and the range."""
    data = with_api(**{key: value}) if section == "api" else minimal(**{section: {key: value}})

    problems = problems_of(data)

    assert len(problems) == 1
    assert problems[0].startswith(f"{section}.{key}: expected ")
    assert problems[0].endswith(f"got {value!r}")


def test_range_edges_are_accepted():
    """The documented inclusive bounds are themselves valid values."""
    config = parse_config(
        {
            "api": {
                "base_url": BASE_URL,
                "timeout_seconds": 300,
                "max_requests_per_second": 10000,
                "max_concurrency": 256,
                "max_response_bytes": 64 * 1024 * 1024,
            },
            "polling": {
                "interval_seconds": 0.5,
                "jitter_ratio": 0.5,
                "terminal_retention_seconds": 0,
                "initial_backoff_seconds": 2,
                "max_backoff_seconds": 2,
            },
            "server": {"port": 0},
            "reload": {"watch_interval_seconds": 0},
        },
        environ=REGION_ENV,
    )

    assert config.api.max_concurrency == 256
    assert config.api.max_response_bytes == 64 * 1024 * 1024
    assert config.polling.interval_seconds == 0.5
    assert config.polling.jitter_ratio == 0.5
    assert config.server.port == 0
    assert config.reload.watch_interval_seconds == 0.0


def test_range_edges_of_ingestions_admin_and_state_are_accepted():
    """The inclusive bounds of the directory poll, max_tracked, admin port and debounce."""
    low = parse_config(
        minimal(
            ingestions={"directory_poll_seconds": 0.01, "max_tracked": 1},
            admin={"port": 0},
            state={"debounce_seconds": 0},
        ),
        environ=REGION_ENV,
    )
    high = parse_config(
        minimal(
            ingestions={"directory_poll_seconds": 3600, "max_tracked": 10_000_000},
            admin={"port": 65535},
            state={"debounce_seconds": 60},
        ),
        environ=REGION_ENV,
    )

    assert (low.ingestions.max_tracked, low.admin.port, low.state.debounce_seconds) == (1, 0, 0.0)
    assert high.ingestions.directory_poll_seconds == 3600.0
    assert high.ingestions.max_tracked == 10_000_000
    assert high.admin.port == 65535
    assert high.state.debounce_seconds == 60.0


def test_integral_float_is_accepted_as_an_integer_and_fraction_is_not():
    """`port: 8080.0` is read as 8080; `max_concurrency: 2.5` is an error."""
    config = parse_config(minimal(server={"port": 8080.0}), environ=REGION_ENV)
    problems = problems_of(with_api(max_concurrency=2.5))

    assert config.server.port == 8080
    assert isinstance(config.server.port, int)
    assert problems == ("api.max_concurrency: expected an integer from 1 to 256, got 2.5",)


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_number_is_rejected(tmp_path, value):
    """YAML .inf and .nan are refused even where there is no upper bound."""
    path = write(
        tmp_path, f"api:\n  base_url: {BASE_URL}\npolling:\n  terminal_retention_seconds: {value}\n"
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("polling.terminal_retention_seconds: expected")


def test_max_backoff_below_initial_backoff_is_reported_on_max_backoff():
    """The cross-field check names polling.max_backoff_seconds and the bound it broke."""
    problems = problems_of(
        minimal(polling={"initial_backoff_seconds": 10, "max_backoff_seconds": 5})
    )

    assert problems == (
        "polling.max_backoff_seconds: expected a number >= "
        "polling.initial_backoff_seconds (10), got 5",
    )


def test_choices_are_case_insensitive_and_stored_lower_case():
    """`level: DEBUG` and `format: Console` are accepted and stored lower-case."""
    config = parse_config(
        minimal(logging={"level": "DEBUG", "format": "Console"}), environ=REGION_ENV
    )

    assert config.logging == LoggingConfig(level="debug", format="console")


def test_unknown_choice_lists_the_choices_and_suggests_one():
    """A choice not in the list names every allowed value and the nearest one."""
    problems = problems_of(minimal(logging={"level": "warn"}))

    assert problems == (
        "logging.level: expected one of debug, info, warning, error, got 'warn'; "
        "did you mean 'warning'?",
    )


def test_empty_server_host_is_rejected():
    """An empty listen address is an error on server.host."""
    problems = problems_of(minimal(server={"host": ""}))

    assert len(problems) == 1
    assert problems[0].startswith("server.host: expected a host name or address")


# Ingestion ids


@pytest.mark.parametrize(
    ("bad_id", "expected"),
    [
        ("x" * 256, "expected at most 255 characters, got 256"),
        ("", "must not be empty"),
        ("abc\ndef", "must not contain control characters, found '\\n'"),
        ("abc\x00def", "must not contain control characters, found '\\x00'"),
        ("abc\tdef", "must not contain control characters, found '\\t'"),
        ("abc\x7f", "must not contain control characters, found '\\x7f'"),
        (12345, "expected a string (quote ids in YAML), got 12345"),
        (True, "expected a string (quote ids in YAML), got true"),
        (["a"], "expected a string (quote ids in YAML), got a list"),
    ],
)
def test_bad_ingestion_id_is_reported_by_its_index(bad_id, expected):
    """Each bad id is one problem at ingestions.ids[index]; good ids around it are fine."""
    problems = problems_of(minimal(ingestions={"ids": ["good-1", "good-2", "good-3", bad_id]}))

    assert len(problems) == 1
    assert problems[0].startswith(f"ingestions.ids[3]: {expected}")


def test_every_bad_ingestion_id_is_reported_not_just_the_first():
    """Three bad ids in one list give three problems with their own indices."""
    problems = problems_of(minimal(ingestions={"ids": ["", "ok", 7, "a\rb"]}))

    assert [p.split(":", 1)[0] for p in problems] == [
        "ingestions.ids[0]",
        "ingestions.ids[2]",
        "ingestions.ids[3]",
    ]


def test_ingestion_id_of_exactly_255_characters_is_accepted():
    """255 characters is the API's limit and still valid."""
    config = parse_config(minimal(ingestions={"ids": ["y" * 255]}), environ=REGION_ENV)

    assert config.ingestions.ids == ("y" * 255,)


def test_duplicate_ids_are_removed_keeping_first_order():
    """Repeated ids are kept once, in the order they first appear."""
    config = parse_config(
        minimal(ingestions={"ids": ["b", "a", "b", "c", "a"]}), environ=REGION_ENV
    )

    assert config.ingestions.ids == ("b", "a", "c")


def test_ids_that_are_not_a_list_are_rejected():
    """A single string instead of a list is an error on ingestions.ids."""
    problems = problems_of(minimal(ingestions={"ids": "abc"}))

    assert problems == ("ingestions.ids: expected a list of ingestion ids, got 'abc'",)


# Authentication


def bearer(**auth: object) -> dict[str, object]:
    """A document using bearer auth with the given auth keys."""
    return {"api": {"base_url": BASE_URL, "auth": {"type": "bearer", **auth}}}


def test_bearer_token_file_that_exists_is_accepted(tmp_path):
    """A readable regular token file is valid, and its path is kept, not its content."""
    path = token_file(tmp_path)

    config = parse_config(bearer(token_file=str(path)), environ={})

    assert config.api.auth.type == "bearer"
    assert config.api.auth.token_file == str(path)
    assert SECRET not in repr(config)


def test_bearer_token_file_that_is_missing_is_reported_without_its_path(tmp_path):
    """A token file that does not exist is an error on api.auth.token_file; the path is not
    quoted (the key may hold a pasted token), only its kind and length."""
    missing = tmp_path / "nope" / "token"

    problems = problems_of(bearer(token_file=str(missing)), environ={})

    assert problems == (
        "api.auth.token_file: the file named here "
        f"(an absolute path of {len(str(missing))} characters, not shown) does not exist",
    )


def test_token_files_that_do_not_exist_yet_are_accepted_when_the_caller_allows_it(tmp_path):
    """With token_files_may_be_absent (--on-invalid-config=serve) a missing API or admin token
    file is no problem (it is read at request time); anything else about it still is."""
    missing = str(tmp_path / "secret" / "token")
    document = {**bearer(token_file=missing), "admin": {"token_file": missing}}

    config = parse_config(document, environ={}, token_files_may_be_absent=True)

    assert config.api.auth.token_file == missing == config.admin.token_file
    with pytest.raises(ConfigError) as caught:
        parse_config(bearer(token_file=str(tmp_path)), environ={}, token_files_may_be_absent=True)
    assert "is not a regular file" in caught.value.problems[0]


def test_bearer_token_file_that_is_a_directory_is_rejected(tmp_path):
    """A directory is not a token file."""
    problems = problems_of(bearer(token_file=str(tmp_path)), environ={})

    assert problems == (
        "api.auth.token_file: the path named here "
        f"(an absolute path of {len(str(tmp_path))} characters, not shown) is not a regular file",
    )


def test_bearer_token_file_over_the_secret_bound_is_rejected_at_load(tmp_path):
    """A token file larger than MAX_SECRET_BYTES is refused from its size, unread."""
    huge = tmp_path / "token"
    with huge.open("wb") as file:
        file.truncate(MAX_SECRET_BYTES + 1)

    problems = problems_of(bearer(token_file=str(huge)), environ={})

    assert problems == (
        f"api.auth.token_file: the file named here (an absolute path of {len(str(huge))} "
        f"characters, not shown) is too large for a token "
        f"({MAX_SECRET_BYTES + 1} > {MAX_SECRET_BYTES} bytes)",
    )


def test_bearer_token_env_that_is_unset_or_empty_is_reported_by_name():
    """token_env naming an unset or blank variable is an error on api.auth.token_env."""
    expected = (
        "api.auth.token_env: environment variable 'CATALOG_API_TOKEN' is not set or is empty",
    )

    assert problems_of(bearer(token_env="CATALOG_API_TOKEN"), environ={}) == expected
    assert (
        problems_of(bearer(token_env="CATALOG_API_TOKEN"), environ={"CATALOG_API_TOKEN": "  "})
        == expected
    )


def test_bearer_token_env_that_is_set_is_accepted():
    """token_env naming a set, non-empty variable is valid; only the name is kept."""
    config = parse_config(
        bearer(token_env="CATALOG_API_TOKEN"), environ={"CATALOG_API_TOKEN": SECRET}
    )

    assert config.api.auth.token_env == "CATALOG_API_TOKEN"
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("auth", "which"), [({}, "neither is set"), ({"token_env": "T", "token_file": "/t"}, "both")]
)
def test_bearer_needs_exactly_one_token_source(auth, which):
    """Bearer with neither or both of token_file / token_env is one error on api.auth."""
    problems = problems_of(bearer(**auth), environ={"T": SECRET})

    assert len(problems) == 1
    assert problems[0].startswith("api.auth: type: bearer needs exactly one of token_file")
    assert which in problems[0]


def test_secret_values_never_appear_in_the_error(tmp_path):
    """No problem echoes a token (from env, file, or pasted in a wrong key) or URL credentials."""
    path = token_file(tmp_path)
    environ = {"CATALOG_API_TOKEN": SECRET}
    documents = [
        {
            "api": {
                "base_url": BASE_URL,
                "auth": {"type": "bearer", "token_env": "CATALOG_API_TOKEN"},
                "timeout_seconds": -1,
            }
        },
        {
            "api": {
                "base_url": BASE_URL,
                "auth": {"type": "bearer", "token_file": str(path)},
                "max_concurrency": 0,
            }
        },
        bearer(token_env=SECRET),
        bearer(token_env="CATALOG_API_TOKEN", scheme=f"Bearer {SECRET}"),
        bearer(token_env="CATALOG_API_TOKEN", header=f"Authorization: Bearer {SECRET}"),
        {"api": {"base_url": f"https://user:{SECRET}@api.example.com/"}},
        {"api": {"base_url": f"https://api.example.com/prod?api_key={SECRET}"}},
        {"api": {"base_url": f"ftp://api.example.com/prod#{SECRET}"}},
        {
            "api": {
                "base_url": BASE_URL,
                "auth": {"type": "sigv4", "region": "us-east-1", "token_env": SECRET},
            }
        },
    ]

    for document in documents:
        with pytest.raises(ConfigError) as caught:
            parse_config(document, environ=environ)
        assert SECRET not in str(caught.value)


def test_token_keys_with_sigv4_are_reported_as_bearer_only(tmp_path):
    """token_file / token_env with type sigv4 are errors saying they belong to bearer."""
    problems = problems_of(
        {
            "api": {
                "base_url": BASE_URL,
                "auth": {"token_file": str(token_file(tmp_path)), "token_env": "X"},
            }
        }
    )

    assert problems == (
        "api.auth.token_file: only used with type: bearer",
        "api.auth.token_env: only used with type: bearer",
    )


def test_auth_type_none_needs_no_region_and_ignores_token_keys():
    """type none accepts a config with no region and unused token keys."""
    config = parse_config(
        {"api": {"base_url": BASE_URL, "auth": {"type": "none", "token_env": "UNSET"}}},
        environ={},
    )

    assert config.api.auth.type == "none"
    assert config.api.auth.region == ""


def test_bad_header_name_and_scheme_are_rejected():
    """The bearer header must be an HTTP token, and the scheme one word or empty."""
    problems = problems_of(
        bearer(token_env="T", header="X Api Key", scheme="Bearer token"), environ={"T": "x"}
    )

    assert [p.split(":", 1)[0] for p in problems] == ["api.auth.header", "api.auth.scheme"]


def test_empty_scheme_is_allowed_for_a_bare_token():
    """scheme "" is valid: the token is sent without a prefix."""
    config = parse_config(bearer(token_env="T", header="X-Api-Key", scheme=""), environ={"T": "x"})

    assert config.api.auth.header == "X-Api-Key"
    assert config.api.auth.scheme == ""


def test_role_arn_must_look_like_an_arn():
    """A role_arn not starting with arn: is an error; a real one is kept."""
    problems = problems_of(with_api(auth={"region": "us-east-1", "role_arn": "my-role"}))
    config = parse_config(
        with_api(auth={"role_arn": "arn:aws:iam::123456789012:role/x"}), environ=REGION_ENV
    )

    assert len(problems) == 1
    assert problems[0].startswith("api.auth.role_arn: expected a role ARN")
    assert config.api.auth.role_arn == "arn:aws:iam::123456789012:role/x"


def test_unknown_auth_type_is_reported_with_a_suggestion():
    """type: sigv is an error suggesting sigv4 (the value itself not quoted: api.auth is
    secret), with no follow-on region problem."""
    problems = problems_of(with_api(auth={"type": "sigv"}), environ={})

    assert problems == (
        "api.auth.type: expected one of sigv4, bearer, none, "
        "got a string of 4 characters (not shown); did you mean 'sigv4'?",
    )


# Region


def test_region_in_the_file_wins_over_the_environment():
    """api.auth.region set in the file is used even when AWS_REGION is set."""
    config = parse_config(with_api(auth={"region": "us-west-2"}), environ=REGION_ENV)

    assert config.api.auth.region == "us-west-2"


def test_region_comes_from_aws_region_then_aws_default_region():
    """An empty region is filled from AWS_REGION, else from AWS_DEFAULT_REGION."""
    both = {"AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": "us-east-2"}
    default_only = {"AWS_REGION": "", "AWS_DEFAULT_REGION": "us-east-2"}

    assert parse_config(minimal(), environ=both).api.auth.region == "eu-central-1"
    assert parse_config(minimal(), environ=default_only).api.auth.region == "us-east-2"


def test_environ_defaults_to_the_process_environment(monkeypatch):
    """Without environ=, the region is read from os.environ."""
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "sa-east-1")

    assert parse_config(minimal()).api.auth.region == "sa-east-1"


def test_missing_region_for_sigv4_is_reported_on_api_auth_region():
    """sigv4 with no region in the file or the environment is an error naming both places."""
    problems = problems_of(minimal(), environ={})

    assert problems == (
        "api.auth.region: required with type: sigv4; "
        "set it here or in AWS_REGION or AWS_DEFAULT_REGION",
    )


def test_malformed_region_from_the_environment_is_reported_with_its_source():
    """A region that is not shaped like one is an error that says where it came from (and
    not what it was: a secret key in the wrong variable must not be printed)."""
    problems = problems_of(minimal(), environ={"AWS_REGION": "US East"})

    assert problems == (
        "api.auth.region: expected an AWS region such as us-east-1, "
        "got a string of 7 characters (not shown) (from AWS_REGION)",
    )


# base_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("api.example.com/prod", "expected an http:// or https:// URL, got 'api.example.com/prod'"),
        ("ftp://api.example.com/prod", "expected an http:// or https:// URL"),
        ("https://api.example.com/prod?stage=1", "must not have a query string"),
        ("https://api.example.com/prod?", "must not have a query string"),
        ("https://api.example.com/#top", "must not have a fragment"),
        ("https:///prod", "expected a URL with a host"),
        ("https://api.example.com:99999/", "is not a valid URL"),
        ("https://api.example.com/a b", "must not contain spaces or control characters"),
        ("", "expected an http:// or https:// URL, got ''"),
    ],
)
def test_bad_base_url_is_reported(url, expected):
    """A base_url that is not a plain http(s) URL with a host is one problem on api.base_url."""
    problems = problems_of({"api": {"base_url": url}})

    assert len(problems) == 1
    assert problems[0].startswith(f"api.base_url: {expected}")


def test_base_url_keeps_its_path_prefix_and_loses_trailing_slashes():
    """An API Gateway stage path is kept; trailing "/" are stripped."""
    config = parse_config({"api": {"base_url": "http://127.0.0.1:8080/prod//"}}, environ=REGION_ENV)

    assert config.api.base_url == "http://127.0.0.1:8080/prod"


def test_base_url_that_is_not_a_string_is_rejected():
    """A number for base_url is a type error, not coerced."""
    problems = problems_of({"api": {"base_url": 42}})

    assert problems == ("api.base_url: expected a string, got 42",)


# Reading the file


def test_yaml_syntax_error_is_reported_with_line_and_column(tmp_path):
    """Broken YAML is a ConfigError naming the file, line and column, not a yaml exception."""
    path = write(tmp_path, f"api:\n  base_url: {BASE_URL}\n  auth: [sigv4\npolling: {{\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: YAML syntax error at line ")
    assert ", column " in problem


def test_yaml_syntax_error_does_not_quote_the_document(tmp_path):
    """The syntax-error message does not reproduce lines of the file, which may hold secrets."""
    path = write(tmp_path, f"# {SECRET}\napi:\n  base_url: {SECRET}: [\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_reported(tmp_path, text):
    """A file with no document is a ConfigError saying it is empty."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (
        f"{path}: the file is empty; at least api.base_url is required",
    )


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("- api\n- polling\n", "a list"),
        ("just words\n", "a string of 10 characters (not shown)"),
    ],
)
def test_top_level_that_is_not_a_mapping_is_reported(tmp_path, text, got):
    """A list or scalar document is one problem on the top level; a scalar is not quoted
    (a token file given as --config by mistake must not be printed)."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (f"(top level): expected a mapping of sections, got {got}",)


def test_missing_file_is_a_config_error(tmp_path):
    """A path that does not exist is a ConfigError naming it."""
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (f"{path}: cannot read the file: No such file or directory",)


def test_directory_or_non_utf8_file_is_a_config_error(tmp_path):
    """A directory, or bytes that are not UTF-8, give a ConfigError, not an OSError."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"api:\n  base_url: \xff\xfe\n")

    for path in (tmp_path, binary):
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=REGION_ENV)
        assert caught.value.problems[0].startswith(f"{path}: cannot read the file: ")


def test_repeated_keys_at_any_depth_are_each_refused_naming_path_and_lines(tmp_path):
    """A repeated section and a repeated nested key are two problems, each with both lines."""
    path = write(
        tmp_path,
        f"api:\n  base_url: {BASE_URL}\n"  # lines 1-2
        "polling:\n  interval_seconds: 10\n"  # lines 3-4
        "ingestions:\n  ids: [a]\n"  # lines 5-6
        "polling:\n  jitter_ratio: 0.1\n  jitter_ratio: 0.2\n",  # lines 7-9
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (
        f"polling: key repeated in {path} at lines 3 and 7; "
        "YAML would keep only the last, so say it once",
        f"polling.jitter_ratio: key repeated in {path} at lines 8 and 9; "
        "YAML would keep only the last, so say it once",
    )


def test_a_repeated_key_inside_a_list_item_is_named_by_its_index(tmp_path):
    """The key path of a repeat below a list names the item's index."""
    path = write(tmp_path, f"api:\n  base_url: {BASE_URL}\nx:\n  - {{a: 1}}\n  - {{b: 1, b: 2}}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (
        f"x[1].b: key repeated in {path} at lines 5 and 5; "
        "YAML would keep only the last, so say it once",
    )


def test_a_merge_key_overridden_by_the_mapping_is_not_a_repeat(tmp_path):
    """`<<: *anchor` then the same key is YAML's override, not a repeated key."""
    path = write(
        tmp_path,
        f"api: {{base_url: '{BASE_URL}'}}\n"
        "base: &base {interval_seconds: 30, jitter_ratio: 0.2}\n"
        "polling:\n  <<: *base\n  interval_seconds: 15\n",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    # Only the unknown `base` section is refused; the override is YAML's merge at work.
    assert caught.value.problems == ("base: unknown key",)


def test_a_config_file_over_the_size_cap_is_refused_unparsed(tmp_path):
    """A valid document one byte over MAX_CONFIG_BYTES (16 MiB) is refused, naming the cap."""
    head = f"api:\n  base_url: {BASE_URL}\n"
    padding = "#" + "x" * 1023 + "\n"
    body = head + padding * ((MAX_CONFIG_BYTES - len(head)) // len(padding))
    body += "#" * (MAX_CONFIG_BYTES - len(body) - 1) + "\n"
    path = write(tmp_path, body)
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path, environ=REGION_ENV).api.base_url == BASE_URL

    with path.open("a") as file:
        file.write("\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=REGION_ENV)

    assert caught.value.problems == (
        f"{path}: the file is larger than {MAX_CONFIG_BYTES} bytes (16 MiB), the most a config "
        "may be; list many ids in ingestions.directory or the admin API instead",
    )
    assert MAX_CONFIG_BYTES == 16 * 1024 * 1024


def test_a_stream_longer_than_the_cap_is_refused_after_reading_only_the_cap(tmp_path, monkeypatch):
    """A FIFO (size 0 to stat) is read no further than the cap and then refused."""
    monkeypatch.setattr("exporter.yamlfile.MAX_CONFIG_BYTES", 100)
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    written: list[int] = []

    def feed() -> None:
        pipe = os.open(fifo, os.O_WRONLY)
        try:
            for _ in range(1000):
                written.append(os.write(pipe, b"#" * 99 + b"\n"))
        except BrokenPipeError:
            pass  # the loader stopped reading: what the test wants
        finally:
            os.close(pipe)

    writer = threading.Thread(target=feed)
    writer.start()
    with pytest.raises(ConfigError) as caught:
        load_config(fifo, environ=REGION_ENV)
    writer.join(timeout=10)

    assert "larger than 100 bytes" in caught.value.problems[0]
    assert sum(written) < 1000 * 100


def test_load_config_accepts_a_str_path(tmp_path):
    """load_config takes a str as well as a PathLike."""
    path = write(tmp_path, f"api:\n  base_url: {BASE_URL}/\n")

    assert load_config(str(path), environ=REGION_ENV).api.base_url == BASE_URL


# Booleans


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "expected true or false, got 0"),
        (1, "expected true or false, got 1"),
        (1.0, "expected true or false, got 1.0"),
        ("true", "expected true or false, got 'true' (a string to YAML: drop the quotes)"),
        ("No", "expected true or false, got 'No' (a string to YAML: drop the quotes)"),
        ("enabled", "expected true or false, got 'enabled'"),
        ([True], "expected true or false, got a list"),
    ],
)
def test_non_boolean_enabled_is_rejected(value, expected):
    """Only a YAML boolean is accepted: not 0/1 and not a quoted string."""
    problems = problems_of(minimal(admin={"enabled": value}))

    assert problems == (f"admin.enabled: {expected}",)


@pytest.mark.parametrize(("word", "enabled"), [("false", False), ("off", False), ("yes", True)])
def test_yaml_boolean_spellings_are_accepted(tmp_path, word, enabled):
    """Unquoted true/false, yes/no and on/off are YAML booleans, and so valid."""
    path = write(tmp_path, f"api:\n  base_url: {BASE_URL}\nadmin:\n  enabled: {word}\n")

    assert load_config(path, environ=REGION_ENV).admin.enabled is enabled


# Ingestions: directory, max_tracked, labels


def test_ingestions_directory_that_exists_or_is_missing_is_accepted(tmp_path):
    """An existing directory is valid, and so is a missing one that may be created later."""
    missing = tmp_path / "later" / "uploads"

    existing = parse_config(minimal(ingestions={"directory": str(tmp_path)}), environ=REGION_ENV)
    later = parse_config(minimal(ingestions={"directory": str(missing)}), environ=REGION_ENV)

    assert existing.ingestions.directory == str(tmp_path)
    assert later.ingestions.directory == str(missing)


def test_ingestions_directory_that_is_a_file_is_rejected(tmp_path):
    """A path that exists but is not a directory is an error on ingestions.directory."""
    path = token_file(tmp_path)

    problems = problems_of(minimal(ingestions={"directory": str(path)}))

    assert problems == (f"ingestions.directory: {str(path)!r} is not a directory",)


def test_ingestions_directory_under_a_file_cannot_be_checked(tmp_path):
    """A directory below a regular file can never exist, so it is an error, not 'later'."""
    path = token_file(tmp_path) / "uploads"

    problems = problems_of(minimal(ingestions={"directory": str(path)}))

    assert problems == (
        f"ingestions.directory: directory {str(path)!r} cannot be checked: Not a directory",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("uploads", "expected an absolute path, got 'uploads'"),
        ("./uploads", "expected an absolute path, got './uploads'"),
        ("/var/run/up\nloads", "must not contain control characters"),
        ("/var/run/up\x00loads", "must not contain control characters"),
        (7, "expected a string, got 7"),
        (False, "expected a string, got false"),
    ],
)
def test_bad_ingestions_directory_is_reported(value, expected):
    """A relative path, a control character or a non-string is one problem on the key."""
    problems = problems_of(minimal(ingestions={"directory": value}))

    assert problems == (f"ingestions.directory: {expected}",)


def test_more_config_ids_than_max_tracked_is_reported_on_ids():
    """Distinct config ids above ingestions.max_tracked are one error on ingestions.ids."""
    problems = problems_of(minimal(ingestions={"ids": ["a", "b", "c"], "max_tracked": 2}))

    assert problems == ("ingestions.ids: 3 ids exceed ingestions.max_tracked 2",)


def test_duplicate_ids_count_once_against_max_tracked():
    """max_tracked is compared with distinct ids: duplicates are dropped first."""
    config = parse_config(
        minimal(ingestions={"ids": ["a", "b", "a", "b"], "max_tracked": 2}), environ=REGION_ENV
    )

    assert config.ingestions.ids == ("a", "b")


def test_bad_max_tracked_is_not_also_compared_with_the_ids():
    """An invalid max_tracked is reported once, without a follow-on error on the ids."""
    problems = problems_of(minimal(ingestions={"ids": ["a", "b"], "max_tracked": 0}))

    assert problems == ("ingestions.max_tracked: expected an integer from 1 to 10000000, got 0",)


def test_labels_are_kept_in_order_with_duplicates_dropped():
    """Valid label names are stored as a tuple, first-seen order, each once."""
    config = parse_config(
        minimal(ingestions={"labels": ["team", "catalog", "team", "Team", "_x1"]}),
        environ=REGION_ENV,
    )

    assert config.ingestions.labels == ("team", "catalog", "Team", "_x1")


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("1team", "expected a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*), got '1team'"),
        ("team-name", "expected a Prometheus label name"),
        ("team name", "expected a Prometheus label name"),
        ("équipe", "expected a Prometheus label name"),
        ("team\n", "expected a Prometheus label name"),
        ("", "expected a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*), got ''"),
        ("__name__", "names starting with '__' are reserved by Prometheus, got '__name__'"),
        ("__team", "names starting with '__' are reserved by Prometheus"),
        ("ingestion_id", "'ingestion_id' is one of the exporter's own labels"),
        ("status", "'status' is one of the exporter's own labels"),
        ("final_status", "'final_status' is one of the exporter's own labels"),
        ("le", "'le' is one of the exporter's own labels"),
        ("job", "'job' is one of the exporter's own labels"),
        ("instance", "'instance' is one of the exporter's own labels"),
        (5, "expected a string, got 5"),
        (None, "expected a string, got null"),
    ],
)
def test_bad_label_name_is_reported_by_its_index(label, expected):
    """Each bad label name is one problem at ingestions.labels[index]."""
    problems = problems_of(minimal(ingestions={"labels": ["catalog", label]}))

    assert len(problems) == 1
    assert problems[0].startswith(f"ingestions.labels[1]: {expected}")


def test_own_label_problem_lists_every_reserved_name():
    """The message for a reserved name lists all the exporter's own labels."""
    problems = problems_of(minimal(ingestions={"labels": ["job"]}))

    assert problems == (
        "ingestions.labels[0]: 'job' is one of the exporter's own labels "
        "(ingestion_id, status, final_status, le, job, instance)",
    )


def test_ten_distinct_labels_are_accepted_and_eleven_are_not():
    """At most 10 distinct label names; repeats do not count towards the limit."""
    ten = [f"label_{n}" for n in range(10)]

    config = parse_config(minimal(ingestions={"labels": [*ten, *ten]}), environ=REGION_ENV)
    problems = problems_of(minimal(ingestions={"labels": [*ten, "label_10"]}))

    assert config.ingestions.labels == tuple(ten)
    assert problems == ("ingestions.labels: expected at most 10 label names, got 11",)


def test_labels_that_are_not_a_list_are_rejected():
    """A single string instead of a list is an error on ingestions.labels."""
    problems = problems_of(minimal(ingestions={"labels": "team"}))

    assert problems == ("ingestions.labels: expected a list of label names, got 'team'",)


# Admin API


def test_admin_values_given_are_kept(tmp_path):
    """Given admin values (host, port, token file path) are kept; the token itself is not."""
    path = token_file(tmp_path)

    config = parse_config(
        minimal(
            admin={"enabled": True, "host": ALL_INTERFACES, "port": 9000, "token_file": str(path)}
        ),
        environ=REGION_ENV,
    )

    assert config.admin == AdminConfig(
        enabled=True, host=ALL_INTERFACES, port=9000, token_file=str(path)
    )
    assert SECRET not in repr(config)


@pytest.mark.parametrize("host", ["", "local host", "127.0.0.1\n"])
def test_bad_admin_host_is_rejected(host):
    """An empty host, or one with spaces or control characters, is an error on admin.host."""
    problems = problems_of(minimal(admin={"host": host}))

    assert len(problems) == 1
    assert problems[0].startswith(
        "admin.host: expected a host name or address such as 127.0.0.1, got "
    )


def test_admin_port_equal_to_server_port_is_reported_on_admin_port():
    """The two listeners cannot share a port: the error names admin.port and server.port."""
    problems = problems_of(minimal(server={"port": 9000}, admin={"port": 9000}))

    assert problems == ("admin.port: must differ from server.port (9000)",)


def test_admin_port_equal_to_the_default_server_port_is_reported():
    """admin.port set to 10184 collides with the default server.port."""
    problems = problems_of(minimal(admin={"port": DEFAULT_PORT}))

    assert problems == (f"admin.port: must differ from server.port ({DEFAULT_PORT})",)


def test_admin_port_collision_is_reported_even_on_different_hosts():
    """Equal ports are refused whatever the hosts: 0.0.0.0 would overlap 127.0.0.1."""
    problems = problems_of(
        minimal(
            server={"host": ALL_INTERFACES, "port": 9000}, admin={"host": "127.0.0.1", "port": 9000}
        )
    )

    assert problems == ("admin.port: must differ from server.port (9000)",)


def test_admin_and_server_port_zero_do_not_collide():
    """Port 0 picks a free port for each listener, so both may be 0."""
    config = parse_config(minimal(server={"port": 0}, admin={"port": 0}), environ=REGION_ENV)

    assert (config.server.port, config.admin.port) == (0, 0)


def test_disabled_admin_skips_the_port_and_token_file_checks(tmp_path):
    """With enabled: false nothing listens, so a shared port or missing token file is fine."""
    config = parse_config(
        minimal(
            server={"port": 9000},
            admin={"enabled": False, "port": 9000, "token_file": str(tmp_path / "nope")},
        ),
        environ=REGION_ENV,
    )

    assert config.admin.enabled is False


def test_bad_server_port_is_not_also_reported_as_an_admin_collision():
    """An invalid server.port is one problem, without a follow-on on admin.port."""
    problems = problems_of(minimal(server={"port": 70000}, admin={"port": DEFAULT_PORT}))

    assert [p.split(":", 1)[0] for p in problems] == ["server.port"]


def test_admin_token_file_that_is_missing_is_reported_without_its_path(tmp_path):
    """A token file that does not exist is an error on admin.token_file, its path not quoted."""
    missing = tmp_path / "nope" / "admin-token"

    problems = problems_of(minimal(admin={"token_file": str(missing)}))

    assert problems == (
        "admin.token_file: the file named here "
        f"(an absolute path of {len(str(missing))} characters, not shown) does not exist",
    )


def test_admin_token_file_that_is_a_directory_is_rejected(tmp_path):
    """A directory is not a token file."""
    problems = problems_of(minimal(admin={"token_file": str(tmp_path)}))

    assert problems == (
        "admin.token_file: the path named here "
        f"(an absolute path of {len(str(tmp_path))} characters, not shown) is not a regular file",
    )


def test_admin_token_never_appears_in_an_error(tmp_path):
    """Other problems in the admin section never echo the token file's content."""
    path = token_file(tmp_path)

    problems = problems_of(minimal(admin={"token_file": str(path), "port": -1, "host": ""}))

    assert len(problems) == 2
    assert SECRET not in "\n".join(problems)


def test_unknown_admin_and_state_keys_are_reported_with_suggestions():
    """Misspelt keys in the new sections suggest the key they resemble."""
    problems = problems_of(minimal(admin={"tokenfile": "/t"}, stat={"path": ""}))

    # A section's keys are checked before the unknown top-level keys are listed.
    assert problems == (
        "admin.tokenfile: unknown key; did you mean 'token_file'?",
        "stat: unknown key; did you mean 'state'?",
    )


# State file


def test_state_path_whose_file_is_missing_or_present_is_accepted(tmp_path):
    """The state file may be missing (it is created later) or an existing regular file."""
    present = token_file(tmp_path)
    missing = tmp_path / "state.json"

    for path in (missing, present):
        config = parse_config(minimal(state={"path": str(path)}), environ=REGION_ENV)
        assert config.state.path == str(path)


def test_state_path_whose_directory_is_missing_is_reported(tmp_path):
    """The state file's directory must exist: the error names it."""
    path = tmp_path / "missing" / "state.json"

    problems = problems_of(minimal(state={"path": str(path)}))

    assert problems == (f"state.path: directory {str(path.parent)!r} does not exist",)


def test_state_path_whose_parent_is_a_file_is_reported(tmp_path):
    """A parent that is a regular file is not a directory."""
    parent = token_file(tmp_path)

    problems = problems_of(minimal(state={"path": str(parent / "state.json")}))

    assert problems == (f"state.path: {str(parent)!r} is not a directory",)


def test_state_path_that_is_a_directory_is_left_to_the_start(tmp_path):
    """A directory at state.path is no config error (the exporter then runs without
    persistence instead of exiting into a crash loop); a trailing slash still is one."""
    plain = parse_config(minimal(state={"path": str(tmp_path)}), environ=REGION_ENV)
    slashed = problems_of(minimal(state={"path": f"{tmp_path}/"}))

    assert plain.state.path == str(tmp_path)
    assert slashed == (f"state.path: expected a file name after the last '/', got '{tmp_path}/'",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("state.json", "expected an absolute path, got 'state.json'"),
        ("/var/lib/st\tate.json", "must not contain control characters"),
        (["/state.json"], "expected a string, got a list"),
    ],
)
def test_bad_state_path_is_reported(value, expected):
    """A relative path, a control character or a non-string is one problem on state.path."""
    problems = problems_of(minimal(state={"path": value}))

    assert problems == (f"state.path: {expected}",)


@pytest.mark.parametrize("inside", ["state.json", "sub/state.json", "."])
def test_state_path_inside_the_ingestions_directory_is_reported(tmp_path, inside):
    """The state file must not sit where the app drops upload files."""
    directory = tmp_path / "uploads"
    directory.mkdir()
    (directory / "sub").mkdir()

    problems = problems_of(
        minimal(
            ingestions={"directory": f"{directory}/"},
            state={"path": f"{directory}/{inside}"},
        )
    )

    assert problems == (f"state.path: must be outside ingestions.directory ('{directory}/')",)


def test_state_path_naming_the_config_file_is_refused_and_the_file_left_alone(tmp_path):
    """state.path equal to the config file, directly or through a symlink, is a problem on
    state.path naming the config file; the file is not touched."""
    config = tmp_path / "config.yaml"
    link = tmp_path / "link.yaml"
    link.symlink_to(config)
    for named in (config, link):
        text = f"api: {{base_url: {BASE_URL}}}\nstate: {{path: {named}}}\n"
        config.write_text(text, encoding="utf-8")

        with pytest.raises(ConfigError) as caught:
            load_config(config, environ=REGION_ENV)

        assert caught.value.problems == (
            f"state.path: it would be written over the config file ({str(config)!r}); "
            "choose another path",
        )
        assert config.read_text(encoding="utf-8") == text


def test_state_path_naming_a_token_file_or_its_hard_link_is_refused(tmp_path):
    """The API's and the admin API's token files, by name or by inode, are never the state."""
    token = token_file(tmp_path)
    hard_link = tmp_path / "token.db"
    os.link(token, hard_link)
    api = {"base_url": BASE_URL, "auth": {"type": "bearer", "token_file": str(token)}}
    admin = {"token_file": str(token)}

    by_api = problems_of({"api": api, "state": {"path": str(hard_link)}})
    by_admin = problems_of(minimal(admin=admin, state={"path": str(token)}))

    assert by_api == (
        f"state.path: it would be written over api.auth.token_file ({str(token)!r}); "
        "choose another path",
    )
    assert by_admin == (
        f"state.path: it would be written over admin.token_file ({str(token)!r}); "
        "choose another path",
    )


def test_state_path_whose_wal_would_be_a_token_file_is_refused(tmp_path):
    """SQLite writes `<state.path>-wal`: that name must not be a token file either."""
    token = tmp_path / "state.db-wal"
    token.write_text(SECRET, encoding="utf-8")
    admin = {"token_file": str(token)}

    problems = problems_of(minimal(admin=admin, state={"path": str(tmp_path / "state.db")}))

    assert problems == (
        f"state.path: the state's -wal file would be written over admin.token_file "
        f"({str(token)!r}); choose another path",
    )


def test_state_path_inside_the_ingestions_directory_through_a_symlink_is_refused(tmp_path):
    """A state directory that is a symlink into ingestions.directory is inside it."""
    directory = tmp_path / "uploads"
    directory.mkdir()
    (tmp_path / "state").symlink_to(directory)

    problems = problems_of(
        minimal(ingestions={"directory": str(directory)}, state={"path": f"{tmp_path}/state/s.db"})
    )

    assert problems == (
        f"state.path: must be outside ingestions.directory ({str(directory)!r}), symlinks resolved",
    )


def test_state_path_beside_the_ingestions_directory_is_accepted(tmp_path):
    """A sibling whose name only starts like the directory's is outside it."""
    config = parse_config(
        minimal(
            ingestions={"directory": str(tmp_path / "uploads")},
            state={"path": str(tmp_path / "uploads.state")},
        ),
        environ=REGION_ENV,
    )

    assert config.state.path == str(tmp_path / "uploads.state")


def test_every_new_problem_is_reported_together_in_key_order(tmp_path):
    """Bad keys across ingestions, admin and state are all reported at once, in key order."""
    problems = problems_of(
        minimal(
            ingestions={"directory": "rel", "labels": ["le"], "max_tracked": 0},
            server={"port": 9000},
            admin={"enabled": 1, "host": ""},
            state={"path": "rel.json", "debounce_seconds": 61},
        )
    )

    assert [p.split(":", 1)[0] for p in problems] == [
        "ingestions.directory",
        "ingestions.max_tracked",
        "ingestions.labels[0]",
        "admin.enabled",
        "admin.host",
        "state.path",
        "state.debounce_seconds",
    ]


# Sharding


def no_hostname() -> str:
    """A stand-in for socket.gethostname that fails the test if the hostname is looked up."""
    raise AssertionError("the hostname must not be looked up")


def sharding_problems(sharding: object, hostname: str | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(sharding=sharding), environ=REGION_ENV, hostname=hostname)
    return caught.value.problems


def test_example_config_sharding_across_a_statefulset_loads_when_edited(tmp_path):
    """The example with total: 3 takes its index from a StatefulSet pod's hostname."""
    text = EXAMPLE.read_text(encoding="utf-8").replace("  total: 1\n", "  total: 3\n")
    assert "  total: 3\n" in text

    config = load_config(write(tmp_path, text), environ={}, hostname="catalog-upload-exporter-1")

    assert config.sharding == ShardingConfig(total=3, index=1)


def test_a_single_replica_never_looks_at_the_hostname(monkeypatch):
    """With total 1 (the default, or given) the index is 0 and no hostname is needed."""
    monkeypatch.setattr("exporter.config_preflight.socket.gethostname", no_hostname)

    for sharding in (None, {}, {"total": 1}, {"total": 1, "index": None}, {"index": 0}):
        config = parse_config(minimal(sharding=sharding), environ=REGION_ENV)
        assert config.sharding == ShardingConfig(total=1, index=0)


def test_an_explicit_index_wins_over_the_hostname(monkeypatch):
    """sharding.index given: the hostname is neither read nor compared."""
    monkeypatch.setattr("exporter.config_preflight.socket.gethostname", no_hostname)

    config = parse_config(
        minimal(sharding={"total": 4, "index": 3}),
        environ={**REGION_ENV, "HOSTNAME": "catalog-upload-exporter-0"},
    )

    assert config.sharding == ShardingConfig(total=4, index=3)


def test_a_null_index_is_the_statefulset_ordinal_of_the_hostname_given():
    """`hostname=` supplies the pod name; its -<ordinal> suffix is the index."""
    config = parse_config(
        minimal(sharding={"total": 3, "index": None}),
        environ=REGION_ENV,
        hostname="catalog-upload-exporter-2",
    )

    assert config.sharding == ShardingConfig(total=3, index=2)


def test_the_hostname_comes_from_the_hostname_variable_then_the_system(monkeypatch):
    """Without `hostname=`, HOSTNAME (set by Kubernetes) is used, else socket.gethostname()."""
    monkeypatch.setattr(
        "exporter.config_preflight.socket.gethostname", lambda: "exporter-1.example.org"
    )
    data = minimal(sharding={"total": 3})

    from_env = parse_config(data, environ={**REGION_ENV, "HOSTNAME": "exporter-2"})
    empty_env = parse_config(data, environ={**REGION_ENV, "HOSTNAME": ""})
    no_env = parse_config(data, environ=REGION_ENV)

    assert from_env.sharding.index == 2
    assert empty_env.sharding.index == 1
    assert no_env.sharding.index == 1


def test_load_config_passes_the_hostname_on(tmp_path):
    """load_config's `hostname=` reaches the sharding check."""
    path = write(tmp_path, f"api: {{base_url: '{BASE_URL}'}}\nsharding: {{total: 2}}\n")

    config = load_config(path, environ=REGION_ENV, hostname="catalog-upload-exporter-1")

    assert config.sharding == ShardingConfig(total=2, index=1)


def test_index_not_below_total_is_reported_on_index():
    """An explicit index must be below total, 0 when total is 1."""
    assert sharding_problems({"total": 3, "index": 3}) == (
        "sharding.index: expected an integer from 0 to 2 (below sharding.total 3), got 3",
    )
    assert sharding_problems({"index": 1}) == (
        "sharding.index: expected an integer from 0 to 0 (below sharding.total 1), got 1",
    )


def test_a_hostname_without_an_ordinal_is_reported_on_index():
    """total > 1, index null and a hostname with no -<ordinal>: one problem naming it."""
    problems = sharding_problems({"total": 3}, hostname="catalog-upload-exporter-7d9f8-xkq2p")

    assert problems == (
        "sharding.index: set sharding.index or run in a StatefulSet whose pod names end in "
        "-<ordinal>; hostname 'catalog-upload-exporter-7d9f8-xkq2p' has none",
    )


def test_an_ordinal_not_below_total_is_reported_naming_the_hostname():
    """A fourth pod of a three-shard StatefulSet (or a Deployment's all-digit suffix) fails."""
    problems = sharding_problems({"total": 3}, hostname="catalog-upload-exporter-3")

    assert problems == (
        "sharding.index: hostname 'catalog-upload-exporter-3' gives ordinal 3, but "
        "sharding.total is 3 (ordinals 0 to 2): run as many replicas as sharding.total, or "
        "set sharding.index",
    )


def test_a_fully_qualified_hostname_gives_the_ordinal_of_its_first_label():
    """With setHostnameAsFQDN the pod name is the first label of the hostname."""
    config = parse_config(
        minimal(sharding={"total": 3}),
        environ=REGION_ENV,
        hostname="catalog-upload-exporter-1.catalog-upload-exporter.shop.svc.cluster.local",
    )

    assert config.sharding.index == 1


def test_a_bad_total_is_reported_alone_without_an_index_check(monkeypatch):
    """A wrong total is one problem: the index is not compared and no hostname is read."""
    monkeypatch.setattr("exporter.config_preflight.socket.gethostname", no_hostname)

    assert sharding_problems({"total": "3"}) == (
        "sharding.total: expected an integer from 1 to 1024, got '3' "
        "(a string to YAML: drop any quotes, and write exponents like 1.0e+3)",
    )
    assert sharding_problems({"total": 0, "index": 5}) == (
        "sharding.total: expected an integer from 1 to 1024, got 0",
    )
    assert sharding_problems({"total": True, "index": None}) == (
        "sharding.total: expected an integer from 1 to 1024, got true "
        "(YAML reads unquoted yes/no/on/off/true/false as booleans)",
    )


def test_sharding_that_is_not_a_mapping_or_has_unknown_keys_is_reported():
    """`sharding: 3` is one problem; a misspelt key suggests the real one."""
    assert sharding_problems(3) == ("sharding: expected a mapping, got 3",)
    assert sharding_problems({"totl": 2, "replicas": 2}) == (
        "sharding.totl: unknown key; did you mean 'total'?",
        "sharding.replicas: unknown key",
    )


def test_sharding_problems_are_listed_after_the_other_sections():
    """Sharding is read last, so its problems come last, with everything else found."""
    problems = problems_of(
        minimal(
            server={"port": -1},
            state={"debounce_seconds": 61},
            sharding={"total": 2, "index": 2},
        )
    )

    assert [p.split(":", 1)[0] for p in problems] == [
        "server.port",
        "state.debounce_seconds",
        "sharding.index",
    ]


def test_cardinality_controls_default_to_full_one_hot_and_one_retention():
    """metrics.status_series is "all" and DONE keeps the terminal retention by default."""
    config = parse_config(minimal(), environ=REGION_ENV)
    assert config.metrics.status_series == "all"
    assert config.polling.done_retention_seconds is None
    assert config.polling.retention_for("DONE") == config.polling.terminal_retention_seconds


def test_done_retention_applies_to_done_only():
    """A shorter done_retention_seconds leaves FATAL and CANCELLED at the terminal retention."""
    config = parse_config(
        minimal(polling={"terminal_retention_seconds": 86400, "done_retention_seconds": 600}),
        environ=REGION_ENV,
    )
    assert config.polling.retention_for("DONE") == 600
    assert config.polling.retention_for("FATAL") == 86400
    assert config.polling.retention_for("CANCELLED") == 86400


def test_bad_cardinality_settings_are_named():
    """An unknown status_series mode and a negative done retention are both reported."""
    problems = problems_of(
        minimal(metrics={"status_series": "some"}, polling={"done_retention_seconds": -1})
    )
    assert any(p.startswith("metrics.status_series:") for p in problems)
    assert any(p.startswith("polling.done_retention_seconds:") for p in problems)


def test_proxy_listens_on_loopback_only():
    """The proxy signs with the exporter's credentials: a non-loopback host is refused."""
    (problem,) = problems_of(minimal(proxy={"host": ALL_INTERFACES}))
    assert problem.startswith("proxy.host: '0.0.0.0' is not a loopback address")


def test_proxy_port_must_differ_from_the_other_listeners():
    """An enabled proxy on the admin API's or the metrics port is refused, naming which."""
    for port, other in ((10185, "admin.port (10185)"), (10184, "server.port (10184)")):
        problems = problems_of(minimal(proxy={"enabled": True, "port": port}))
        assert problems == (f"proxy.port: must differ from {other}",)


def test_pre_flight_problems_are_reported_with_the_models_in_the_order_of_the_keys(tmp_path):
    """A missing token file (pre-flight) and a bad interval (the models) in one run, in the
    document's key order; a section with a bad key is still pre-flighted on the others."""
    missing = tmp_path / "nowhere" / "state.db"
    document = {
        **bearer(token_file=str(tmp_path / "no-token")),
        "polling": {"interval_seconds": -1},
        "state": {"path": str(missing)},
        "admin": {"port": "x", "token_file": str(tmp_path / "no-admin-token")},
    }

    problems = problems_of(document)

    assert [problem.split(":", 1)[0] for problem in problems] == [
        "api.auth.token_file",
        "polling.interval_seconds",
        "admin.port",
        "admin.token_file",
        "state.path",
    ]
    assert "does not exist" in problems[0]
    assert problems[4] == f"state.path: directory {str(missing.parent)!r} does not exist"


def test_models_validate_the_document_alone_and_leave_the_surroundings_to_pre_flight():
    """The models read no environment: a sigv4 region or a shard index they leave unset is
    the pre-flight's to fill in (so the same document validates the same anywhere)."""
    config, details, _ = validate_document(minimal(sharding={"total": 3}))

    assert details == []
    assert config is not None
    assert (config.api.auth.region, config.sharding.index) == ("", 0)
    assert "index" not in config.sharding.model_fields_set
    resolved = parse_config(
        minimal(sharding={"total": 3}), environ={"AWS_REGION": "eu-west-1"}, hostname="x-2"
    )
    assert (resolved.api.auth.region, resolved.sharding.index) == ("eu-west-1", 2)
