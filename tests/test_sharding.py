"""Tests for exporter.sharding: one owner per id, even spread, minimal movement, stable answers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from exporter.sharding import Shard, index_from_hostname, jump_hash, shard_of

ROOT = Path(__file__).resolve().parent.parent
N_IDS = 20_000
MAX_TOTAL = 12

#: Computed once with this implementation; any change here re-shuffles every deployed fleet.
GOLDEN_TOTAL = 7
GOLDEN = {
    "a1b2c3d4-0000-4000-8000-000000000001": 1,
    "a1b2c3d4-0000-4000-8000-000000000002": 3,
    "amzn1.ingestion.abc": 3,
    "\u30ab\u30bf\u30ed\u30b0-2024-06-01-\U0001f6d2": 5,  # katakana "catalog", a cart emoji
    "x" * 255: 4,
}

# Code point ranges for generated ids: Latin-1, Greek, Cyrillic, combining marks, CJK,
# Hangul, emoji (outside the BMP, four UTF-8 bytes).
_ALPHABETS = (
    (0x20, 0x7E),
    (0xA0, 0xFF),
    (0x391, 0x3C9),
    (0x410, 0x44F),
    (0x300, 0x36F),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
)


def generated_ids(count: int = N_IDS) -> list[str]:
    """`count` distinct ids, the same every run: UUIDs, amzn1 ids, unicode and long ones."""
    rng = random.Random(20240601)  # reproducible test data
    ids: dict[str, None] = {}
    while len(ids) < count:
        kind = len(ids) % 4
        if kind == 0:
            ids.setdefault(f"{rng.getrandbits(128):032x}")
        elif kind == 1:
            ids.setdefault(f"amzn1.ingestion.{rng.randrange(10**12)}")
        elif kind == 2:
            low, high = rng.choice(_ALPHABETS)
            length = rng.randint(1, 40)
            ids.setdefault("".join(chr(rng.randint(low, high)) for _ in range(length)))
        else:
            length = rng.randint(200, 255)
            ids.setdefault("".join(rng.choice("abcdef0123456789-.") for _ in range(length)))
    return list(ids)


@pytest.fixture(scope="module")
def ids() -> list[str]:
    return generated_ids()


@pytest.fixture(scope="module")
def shards_by_total(ids: list[str]) -> dict[int, list[int]]:
    """shard_of for every generated id, for totals 1 to MAX_TOTAL + 1."""
    return {total: [shard_of(i, total) for i in ids] for total in range(1, MAX_TOTAL + 2)}


def test_the_generated_ids_cover_unicode_and_the_longest_ids(ids):
    """The test data holds 20k distinct ids, multi-byte and astral ones, up to 255 characters."""
    assert len(set(ids)) == N_IDS
    assert any(any(ord(c) > 0xFFFF for c in i) for i in ids)
    assert any(any(0x4E00 <= ord(c) <= 0x9FFF for c in i) for i in ids)
    assert max(map(len, ids)) == 255


@pytest.mark.parametrize("total", range(1, MAX_TOTAL + 1))
def test_every_id_is_owned_by_exactly_one_shard(ids, total):
    """For each total, exactly one of the shards 0..total-1 owns each id: shard_of's."""
    shards = [Shard(index, total) for index in range(total)]
    for ingestion_id in ids:
        owners = [shard.index for shard in shards if shard.owns(ingestion_id)]
        assert owners == [shard_of(ingestion_id, total)], ingestion_id


@pytest.mark.parametrize("total", range(2, 9))
def test_ids_spread_evenly_over_the_shards(shards_by_total, total):
    """Each shard holds within 10% of an equal share of the 20k ids."""
    counts = Counter(shards_by_total[total])
    share = N_IDS / total
    assert sorted(counts) == list(range(total))
    for index, count in counts.items():
        assert abs(count - share) <= 0.1 * share, (index, count, share)


@pytest.mark.parametrize("n", range(1, MAX_TOTAL + 1))
def test_adding_a_shard_moves_about_its_share_of_ids_and_only_to_it(shards_by_total, n):
    """From n to n+1 shards an id keeps its shard or moves to the new one (index n), and
    about 1/(n+1) of the ids move."""
    before, after = shards_by_total[n], shards_by_total[n + 1]
    moved = [new for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) <= {n}
    expected = N_IDS / (n + 1)
    assert abs(len(moved) - expected) <= 0.1 * expected, (len(moved), expected)


@pytest.mark.parametrize("n", range(2, MAX_TOTAL + 2))
def test_removing_the_last_shard_moves_only_its_ids(shards_by_total, n):
    """From n to n-1 shards only the ids of the removed shard (index n-1) move, all of them,
    about 1/n of the ids, spread over the shards that remain."""
    before, after = shards_by_total[n], shards_by_total[n - 1]
    moved = []
    for old, new in zip(before, after, strict=True):
        if old == n - 1:
            moved.append(new)
        else:
            assert new == old
    assert all(0 <= new < n - 1 for new in moved)
    expected = N_IDS / n
    assert abs(len(moved) - expected) <= 0.1 * expected, (len(moved), expected)
    if n > 2:
        assert len(set(moved)) == n - 1, "the removed shard's ids go to every other shard"


def test_known_ids_keep_their_golden_shards():
    """shard_of gives the pinned answers: the mapping is a contract between replicas."""
    assert {i: shard_of(i, GOLDEN_TOTAL) for i in GOLDEN} == GOLDEN


def test_a_fresh_interpreter_with_another_hash_seed_gives_the_same_shards():
    """Two new processes with different PYTHONHASHSEED values (so different str hashes) map
    the golden ids to the same shards as this one."""
    script = (
        "import json, sys\n"
        "from exporter.sharding import shard_of\n"
        "ids = json.loads(sys.stdin.read())\n"
        f"print(json.dumps([[shard_of(i, {GOLDEN_TOTAL}) for i in ids], hash(ids[0])]))\n"
    )
    answers, hashes = [], []
    for seed in ("1", "4242"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(list(GOLDEN)),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        shards, hashed = json.loads(result.stdout)
        answers.append(shards)
        hashes.append(hashed)

    assert hashes[0] != hashes[1], "the seeds must change hash(), or this proves nothing"
    assert answers == [list(GOLDEN.values())] * 2


@pytest.mark.parametrize(
    ("key", "buckets", "bucket"),
    [
        (1, 1, 0),
        (42, 57, 43),
        (256, 1024, 520),
        (0xDEAD10CC, 1, 0),
        (0xDEAD10CC, 666, 361),
        (16045690984833335023, 255, 237),
        (0, 60, 0),
        (1, 60, 55),
        (2, 60, 46),
    ],
)
def test_jump_hash_matches_the_published_algorithms_known_answers(key, buckets, bucket):
    """The answers other implementations of the paper's C++ function give (ClickHouse's
    jumpConsistentHash tests, the Rust crate's examples)."""
    assert jump_hash(key, buckets) == bucket


def test_lone_surrogates_get_a_shard_instead_of_an_error():
    """An id that is not valid UTF-8 text still maps somewhere, the same way every time."""
    assert 0 <= shard_of("abc\ud800", 5) < 5
    assert shard_of("abc\ud800", 5) == shard_of("abc\ud800", 5)


def test_a_single_shard_owns_everything():
    """total 1: index 0 owns every id."""
    shard = Shard()
    assert (shard.index, shard.total) == (0, 1)
    assert all(shard.owns(i) for i in ["", "x", "\U0001f6d2" * 255, "abc\udc80"])


@pytest.mark.parametrize(("index", "total"), [(0, 0), (-1, 3), (3, 3), (5, 2)])
def test_a_shard_outside_its_total_is_refused(index, total):
    """Shard needs total >= 1 and 0 <= index < total."""
    with pytest.raises(ValueError, match="must be"):
        Shard(index, total)


def test_bad_totals_and_keys_are_refused():
    """shard_of needs total >= 1; jump_hash a 64-bit unsigned key and at least one bucket."""
    with pytest.raises(ValueError, match="total must be at least 1"):
        shard_of("x", 0)
    with pytest.raises(ValueError, match="buckets must be at least 1"):
        jump_hash(1, 0)
    for key in (-1, 1 << 64):
        with pytest.raises(ValueError, match="64-bit"):
            jump_hash(key, 3)


def test_a_shard_is_frozen():
    """A Shard cannot be changed in place."""
    shard = Shard(1, 3)
    with pytest.raises(AttributeError):
        shard.index = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("hostname", "index"),
    [
        ("catalog-upload-exporter-3", 3),
        ("catalog-upload-exporter-0", 0),
        ("catalog-upload-exporter-12", 12),
        ("web-1", 1),
        ("a-b-c-7", 7),
        ("catalog-upload-exporter-2.catalog-upload-exporter.shop.svc.cluster.local", 2),
        ("catalog-upload-exporter", None),
        ("catalog-upload-exporter-", None),
        ("catalog-upload-exporter-7d9f8b6c5-xkq2p", None),
        ("catalog-upload-exporter-x3", None),
        ("catalog-upload-exporter-03", None),
        ("catalog-upload-exporter-1234567890", None),
        ("catalog-upload-exporter-\u0663", None),  # an Arabic-Indic three is not an ordinal
        ("-3", None),
        ("3", None),
        ("", None),
        ("localhost", None),
    ],
)
def test_index_from_hostname(hostname, index):
    """The ordinal is the decimal after the last '-' of the first DNS label, else None."""
    assert index_from_hostname(hostname) == index
