"""Ids with invisible format characters (Unicode Cf), or not in Unicode NFC, are refused by
every source."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config
from exporter.models import RejectReason, ingestion_id_problem
from exporter.state import UploadRecord, open_store
from exporter.tracking import Source
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, value, wait_for

#: Look-alikes of "amzn1.ingestion.abc" that render (almost) the same in a dashboard.
INVISIBLE = [
    pytest.param("amzn1.ingestion.\u202ecba", id="U+202E-right-to-left-override"),
    pytest.param("amzn1.ingestion.\u200babc", id="U+200B-zero-width-space"),
    pytest.param("amzn1.ingestion.ab\u200dc", id="U+200D-zero-width-joiner"),
    pytest.param("amzn1.ingestion.\u2060abc", id="U+2060-word-joiner"),
    pytest.param("amzn1.ingestion.abc\ufeff", id="U+FEFF-byte-order-mark"),
    pytest.param("amzn1.ingestion.a\u00adbc", id="U+00AD-soft-hyphen"),
    pytest.param("amzn1.ingestion.\U000e0061bc", id="U+E0061-tag-letter"),
]

REJECTED = "catalog_exporter_rejected_ingestions_total"

#: Spellings that render exactly like an NFC id but are other code points: NFD "café", the
#: Angstrom sign for Å, a Hangul syllable spelled as its jamo.
DECOMPOSED = [
    pytest.param("amzn1.ingestion.cafe\u0301", id="e+U+0301-for-U+00E9"),
    pytest.param("amzn1.ingestion.\u212bngstrom", id="U+212B-angstrom-sign"),
    pytest.param("amzn1.ingestion.\u1100\u1161", id="hangul-jamo"),
]


@pytest.mark.parametrize("ingestion_id", INVISIBLE)
def test_the_shared_rule_refuses_format_characters_with_their_own_reason(
    ingestion_id: str,
) -> None:
    """Every Cf character is `format_characters`, not `control_characters`."""
    assert ingestion_id_problem(ingestion_id) is RejectReason.FORMAT_CHARACTERS


@pytest.mark.parametrize(
    "ingestion_id", ["Grüße/42", "カタログ-1", "shelf 🙂", "q\u0301", "caf\u00e9"]
)
def test_visible_non_ascii_ids_are_still_accepted(ingestion_id: str) -> None:
    """Letters, emoji and combining marks (in NFC: q + U+0301 has no composed form) are
    visible: only format characters and decomposed spellings are refused."""
    assert ingestion_id_problem(ingestion_id) is None


def test_a_config_id_with_a_format_character_is_a_config_error_naming_it() -> None:
    """The config loader names the index, the character and its code point."""
    document = {
        "api": {"base_url": "https://api.example.com", "auth": {"type": "none"}},
        "ingestions": {"ids": ["amzn1.ingestion.ok", "amzn1.ingestion.\u202ecba"]},
    }
    with pytest.raises(ConfigError) as raised:
        parse_config(document)
    [problem] = raised.value.problems
    assert problem.startswith("ingestions.ids[1]: must not contain invisible format characters")
    assert "U+202E" in problem


async def test_the_tracker_refuses_them_from_the_api_and_counts_the_reason(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A registration (the admin API's path) is refused and counted as format_characters."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))
    registration = await running.exporter.tracker.register("a\u200bb", Source.API)
    assert (registration.accepted, registration.reason) == (False, "format_characters")
    assert "invisible format characters" in registration.message
    samples = await running.scrape()
    assert value(samples, REJECTED, reason="format_characters") == 1
    assert list(running.exporter.store) == []


async def test_a_watched_file_naming_one_is_refused_and_counted(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """A plain-text file, a JSON file and an empty file named after one: three refusals."""
    _, url = await start_simulator()
    drop = tmp_path / "ingestions"
    drop.mkdir()
    (drop / "plain").write_text("amzn1.ingestion.\u202ecba\n", encoding="utf-8")
    (drop / "doc.json").write_text(json.dumps({"ingestionId": "amzn1.ingestion.\u200babc"}))
    (drop / "amzn1.ingestion.\u2060abc").touch()
    config = fast_config(
        url, [], ingestions={"directory": str(drop), "directory_poll_seconds": 0.05}
    )
    running = await start_exporter(config)

    async def refused_three() -> bool:
        samples = await running.scrape()
        return value(samples, REJECTED, reason="format_characters") == 3

    await wait_for(refused_three)
    assert list(running.exporter.store) == []


def test_a_state_file_record_with_one_is_dropped_and_the_rest_loads(tmp_path: Path) -> None:
    """A restart does not bring back an id the tracker would refuse today."""
    path = tmp_path / "state.db"
    good = UploadRecord("amzn1.ingestion.abc", ("api",), {}, "INQUEUE", 1.0, 1.0)
    bad = UploadRecord("amzn1.ingestion.\u202ecba", ("api",), {}, "INQUEUE", 1.0, 1.0)
    store, _ = open_store(path)
    assert store is not None
    store.apply(
        [(bad.ingestion_id, bad), (good.ingestion_id, good)], [("amzn1.ingestion.\u200bold", 1.0)]
    )
    store.close()
    store, result = open_store(path)
    assert store is not None
    store.close()
    assert result.snapshot.uploads == (good,)
    assert result.snapshot.retired == {}
    assert result.problem is not None


@pytest.mark.parametrize("ingestion_id", DECOMPOSED)
def test_the_shared_rule_refuses_an_id_not_in_nfc_with_its_own_reason(ingestion_id: str) -> None:
    """Two spellings of one name would be two uploads that render alike: not_nfc, and the
    NFC spelling of the same id is accepted."""
    assert ingestion_id_problem(ingestion_id) is RejectReason.NOT_NFC
    assert ingestion_id_problem(unicodedata.normalize("NFC", ingestion_id)) is None


def test_a_config_id_not_in_nfc_is_a_config_error_naming_the_code_points() -> None:
    """The loader names the index and the decomposed code points; nothing is normalized."""
    document = {
        "api": {"base_url": "https://api.example.com", "auth": {"type": "none"}},
        "ingestions": {"ids": ["amzn1.ingestion.caf\u00e9", "amzn1.ingestion.cafe\u0301"]},
    }
    with pytest.raises(ConfigError) as raised:
        parse_config(document)
    [problem] = raised.value.problems
    assert problem.startswith("ingestions.ids[1]: must be in Unicode normalization form NFC")
    assert "U+0065 U+0301" in problem


async def test_nfc_and_nfd_spellings_of_one_name_are_not_two_uploads(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """The NFC spelling is tracked; the NFD one is refused and counted as not_nfc."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))
    composed = await running.exporter.tracker.register("caf\u00e9", Source.API)
    decomposed = await running.exporter.tracker.register("cafe\u0301", Source.API)
    assert composed.accepted
    assert (decomposed.accepted, decomposed.reason) == (False, "not_nfc")
    assert "NFC" in decomposed.message
    samples = await running.scrape()
    assert value(samples, REJECTED, reason="not_nfc") == 1
    assert [u.ingestion_id for u in running.exporter.store] == ["caf\u00e9"]


async def test_a_watched_file_naming_an_id_not_in_nfc_is_refused_and_counted(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """A plain-text file and a JSON file naming a decomposed id: two not_nfc refusals."""
    _, url = await start_simulator()
    drop = tmp_path / "ingestions"
    drop.mkdir()
    (drop / "plain").write_text("amzn1.ingestion.cafe\u0301\n", encoding="utf-8")
    (drop / "doc.json").write_text(json.dumps({"ingestionId": "amzn1.ingestion.\u212bngstrom"}))
    config = fast_config(
        url, [], ingestions={"directory": str(drop), "directory_poll_seconds": 0.05}
    )
    running = await start_exporter(config)

    async def refused_two() -> bool:
        samples = await running.scrape()
        return value(samples, REJECTED, reason="not_nfc") == 2

    await wait_for(refused_two)
    assert list(running.exporter.store) == []


def test_a_state_file_record_not_in_nfc_is_dropped_and_the_rest_loads(tmp_path: Path) -> None:
    """A record (or a retired id) written before the rule is skipped, not restored."""
    path = tmp_path / "state.db"
    good = UploadRecord("amzn1.ingestion.caf\u00e9", ("api",), {}, "INQUEUE", 1.0, 1.0)
    bad = UploadRecord("amzn1.ingestion.cafe\u0301", ("api",), {}, "INQUEUE", 1.0, 1.0)
    store, _ = open_store(path)
    assert store is not None
    store.apply(
        [(bad.ingestion_id, bad), (good.ingestion_id, good)], [("amzn1.ingestion.\u212bold", 1.0)]
    )
    store.close()
    store, result = open_store(path)
    assert store is not None
    store.close()
    assert result.snapshot.uploads == (good,)
    assert result.snapshot.retired == {}
    assert result.problem is not None
