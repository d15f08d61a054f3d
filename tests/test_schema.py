"""The published JSON Schema: generated from the config models, shipped, and as strict as
the loader wherever JSON Schema can say it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from exporter.config import ConfigError, parse_config
from exporter.config_schema import json_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "config.schema.json"
EXAMPLE = ROOT / "config.example.yaml"
BASE_URL = "https://api.example.com/prod"
REGION_ENV = {"AWS_REGION": "eu-west-1"}


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_config_schema_json_is_what_the_schema_command_prints():
    """config.schema.json equals `catalog-upload-exporter schema` (regenerate it if not)."""
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "schema"],
        capture_output=True,
        text=True,
        check=True,
    )

    assert json.loads(result.stdout) == json_schema()
    assert SCHEMA_FILE.read_text(encoding="utf-8") == result.stdout, (
        "config.schema.json is stale: catalog-upload-exporter schema > config.schema.json"
    )


def test_the_schema_is_a_valid_draft_2020_12_schema_that_names_its_draft():
    """The file is itself a valid JSON Schema and says which draft it is written in."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))

    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["api"]


def test_example_config_names_the_schema_in_a_modeline_and_is_valid(validator):
    """config.example.yaml starts with the yaml-language-server modeline and passes the schema."""
    text = EXAMPLE.read_text(encoding="utf-8")

    assert text.splitlines()[0] == "# yaml-language-server: $schema=./config.schema.json"
    assert list(validator.iter_errors(yaml.safe_load(text))) == []


@pytest.mark.parametrize(
    "document",
    [
        {"api": {"base_url": BASE_URL}},
        # null means the default, for keys and whole sections alike
        {"api": {"base_url": BASE_URL, "auth": None}, "polling": None, "sharding": {"index": None}},
        {"api": {"base_url": BASE_URL}, "polling": {"done_retention_seconds": None}},
        # an integral float where an integer is expected
        {"api": {"base_url": BASE_URL}, "server": {"port": 8080.0}},
        {"api": {"base_url": BASE_URL}, "ingestions": {"ids": ["a", "a"], "labels": ["team"]}},
        {"api": {"base_url": BASE_URL, "auth": {"type": "bearer", "scheme": "", "token_env": "T"}}},
    ],
)
def test_documents_the_loader_accepts_pass_the_schema(validator, document):
    """What the loader accepts, the schema accepts: editors raise no false alarms."""
    parse_config(document, environ={**REGION_ENV, "T": "token"})

    assert list(validator.iter_errors(document)) == []


REFUSED = {
    "unknown top-level key": {"api": {"base_url": BASE_URL}, "ingestion": {}},
    "unknown nested key": {"api": {"base_url": BASE_URL}, "polling": {"intervall_seconds": 5}},
    "unknown auth key": {"api": {"base_url": BASE_URL, "auth": {"zzz": 1}}},
    "missing base_url": {"api": {"timeout_seconds": 5}},
    "missing api": {"polling": {"interval_seconds": 5}},
    "quoted number": {"api": {"base_url": BASE_URL}, "polling": {"interval_seconds": "60"}},
    "bool for a number": {"api": {"base_url": BASE_URL, "max_concurrency": True}},
    "fraction for an integer": {"api": {"base_url": BASE_URL, "max_concurrency": 2.5}},
    "number for a boolean": {"api": {"base_url": BASE_URL}, "admin": {"enabled": 1}},
    "string for a boolean": {"api": {"base_url": BASE_URL}, "admin": {"enabled": "true"}},
    "unknown choice": {"api": {"base_url": BASE_URL}, "logging": {"level": "loud"}},
    "unknown auth type": {"api": {"base_url": BASE_URL, "auth": {"type": "kerberos"}}},
    "port above range": {"api": {"base_url": BASE_URL}, "server": {"port": 65536}},
    "zero timeout": {"api": {"base_url": BASE_URL, "timeout_seconds": 0}},
    "jitter above range": {"api": {"base_url": BASE_URL}, "polling": {"jitter_ratio": 0.51}},
    "negative retention": {
        "api": {"base_url": BASE_URL},
        "polling": {"done_retention_seconds": -1},
    },
    "too many shards": {"api": {"base_url": BASE_URL}, "sharding": {"total": 1025}},
    "section not a mapping": {"api": {"base_url": BASE_URL}, "polling": 5},
    "ids not a list": {"api": {"base_url": BASE_URL}, "ingestions": {"ids": "abc"}},
    "number as an id": {"api": {"base_url": BASE_URL}, "ingestions": {"ids": [12345]}},
    "empty id": {"api": {"base_url": BASE_URL}, "ingestions": {"ids": [""]}},
    "id too long": {"api": {"base_url": BASE_URL}, "ingestions": {"ids": ["x" * 256]}},
    "control character in an id": {"api": {"base_url": BASE_URL}, "ingestions": {"ids": ["a\nb"]}},
    "bad label name": {"api": {"base_url": BASE_URL}, "ingestions": {"labels": ["team-name"]}},
    "reserved label name": {"api": {"base_url": BASE_URL}, "ingestions": {"labels": ["__x"]}},
    "own label name": {"api": {"base_url": BASE_URL}, "ingestions": {"labels": ["job"]}},
    "ftp base_url": {"api": {"base_url": "ftp://api.example.com/"}},
    "base_url with a query": {"api": {"base_url": f"{BASE_URL}?stage=1"}},
    "header with a space": {"api": {"base_url": BASE_URL, "auth": {"header": "X Api Key"}}},
    "role_arn not an ARN": {"api": {"base_url": BASE_URL, "auth": {"role_arn": "my-role"}}},
}


@pytest.mark.parametrize("document", REFUSED.values(), ids=REFUSED.keys())
def test_documents_the_loader_refuses_fail_the_schema_too(validator, document):
    """Unknown keys, wrong types, bad choices and ranges are refused by both."""
    with pytest.raises(ConfigError):
        parse_config(document, environ=REGION_ENV)

    assert list(validator.iter_errors(document)) != []
