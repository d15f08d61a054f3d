"""The published JSON Schema: generated from the config models, shipped, and as strict as
the loader wherever JSON Schema can say it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from exporter.config import ConfigError, parse_config
from exporter.config_schema import json_schema
from exporter.models import MAX_INGESTION_ID_LENGTH, RejectReason, ingestion_id_problem
from tests.conftest import require_tool

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


#: Ids both the loader and the schema must accept.
NORMAL_IDS = {
    "usual": "amzn1.ingestion.9f7c1e2a-0d4b-4c55-8d0e-2f1c3b4a5d6e",
    "one character": "a",
    "255 characters": "x" * 255,
    "255 characters above U+FFFF": "\U0001f642" * 255,
    "letters with diacritics": "Grüße/42",
    "katakana": "カタログ-1",
    "emoji and a space": "shelf 🙂",
    "a combining mark with no composed form": "q\u0301",
    "composed e-acute": "caf\u00e9",
}
#: Ids the loader refuses for a reason a pattern or a length can say.
HOSTILE_IDS = {
    "empty": "",
    "256 characters": "x" * 256,
    "256 characters above U+FFFF": "\U0001f642" * 256,
    "newline inside": "a\nb",
    "newline at the end": "abc\n",  # Python's `$` matches before a final newline
    "only a newline": "\n",
    "tab": "a\tb",
    "NUL": "a\x00b",
    "DEL": "a\x7f",
    "C1 NEL": "a\x85b",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029",
    "lone surrogate": "a\ud800b",
    "right-to-left override": "amzn1.ingestion.\u202ecba",
    "zero-width space": "amzn1.ingestion.\u200babc",
    "byte order mark": "abc\ufeff",
    "soft hyphen": "a\u00adbc",
    "tag letter above U+FFFF": "amzn1.ingestion.\U000e0061bc",
    "format character above U+FFFF": "a\U0001d173",
    "language tag above U+FFFF": "\U000e0001",
}
#: Ids the loader refuses only for not being in NFC, which no pattern can say.
NOT_NFC_IDS = {
    "e + U+0301": "amzn1.ingestion.cafe\u0301",
    "angstrom sign": "amzn1.ingestion.\u212bngstrom",
    "hangul jamo": "amzn1.ingestion.\u1100\u1161",
}


def loader_accepts(ingestion_id: object) -> bool:
    try:
        parse_config(
            {"api": {"base_url": BASE_URL}, "ingestions": {"ids": [ingestion_id]}},
            environ=REGION_ENV,
        )
    except ConfigError:
        return False
    return True


def schema_accepts(validator: Draft202012Validator, ingestion_id: object) -> bool:
    document = {"api": {"base_url": BASE_URL}, "ingestions": {"ids": [ingestion_id]}}
    return not list(validator.iter_errors(document))


@pytest.mark.parametrize(
    ("ingestion_id", "accepted"),
    [pytest.param(i, True, id=name) for name, i in NORMAL_IDS.items()]
    + [pytest.param(i, False, id=name) for name, i in HOSTILE_IDS.items()]
    + [pytest.param(12345, False, id="a number")],
)
def test_the_schema_accepts_exactly_the_ids_the_loader_accepts(validator, ingestion_id, accepted):
    """Normal and hostile ids: the published schema and the loader agree on each."""
    assert loader_accepts(ingestion_id) is accepted
    assert schema_accepts(validator, ingestion_id) is accepted


@pytest.mark.parametrize("ingestion_id", NOT_NFC_IDS.values(), ids=NOT_NFC_IDS.keys())
def test_an_id_not_in_nfc_passes_the_schema_as_its_description_says(validator, ingestion_id):
    """The one documented gap: NFC is beyond a pattern, so only the loader refuses these."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    items = schema["$defs"]["IngestionsConfig"]["properties"]["ids"]["anyOf"][0]["items"]

    assert not loader_accepts(ingestion_id)
    assert schema_accepts(validator, ingestion_id)
    assert "NFC" in items["description"]


@pytest.mark.slow  # every code point, about 2 s each
def test_the_id_pattern_refuses_every_character_the_rule_refuses_and_no_other():
    """Every code point as a one-character id: the published pattern refuses it exactly when
    `ingestion_id_problem` does, NFC aside (one definition, not two that may drift)."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    items = schema["$defs"]["IngestionsConfig"]["properties"]["ids"]["anyOf"][0]["items"]
    pattern = re.compile(items["pattern"])
    assert (items["minLength"], items["maxLength"]) == (1, MAX_INGESTION_ID_LENGTH)
    disagreements = []
    for point in range(0x110000):
        text = chr(point)
        refused = ingestion_id_problem(text) not in (None, RejectReason.NOT_NFC)
        if refused == bool(pattern.search(text)):
            disagreements.append(f"U+{point:04X}")
    assert disagreements == []


#: Prints, as JSON, the code points (surrogates aside: JavaScript strings cannot hold one
#: alone as a code point) the schema's id pattern refuses in an ECMA-262 engine with the
#: Unicode flag, as editors (yaml-language-server) run it.
_ECMA_REFUSED = """
const items = JSON.parse(process.argv[1]);
const pattern = new RegExp(items.pattern, "u");
const refused = [];
for (let point = 0; point <= 0x10ffff; point++) {
  if (point >= 0xd800 && point <= 0xdfff) continue;
  if (!pattern.test(String.fromCodePoint(point))) refused.push(point);
}
if (!pattern.test("abc") || pattern.test("abc\\n")) refused.push(-1);
console.log(JSON.stringify(refused));
"""


@pytest.mark.slow  # every code point, about 2 s each
def test_an_editors_regex_engine_refuses_the_same_characters_as_the_rule():
    """node's ECMA-262 engine (`u` flag) reads the published pattern as Python's does."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    items = schema["$defs"]["IngestionsConfig"]["properties"]["ids"]["anyOf"][0]["items"]
    result = subprocess.run(
        [require_tool("node"), "-e", _ECMA_REFUSED, json.dumps(items)],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = [
        point
        for point in range(0x110000)
        if not 0xD800 <= point <= 0xDFFF
        and ingestion_id_problem(chr(point)) not in (None, RejectReason.NOT_NFC)
    ]

    assert json.loads(result.stdout) == expected
