"""A reload's config ids: only the difference from the previous config is applied."""

from __future__ import annotations

import random

import pytest

from exporter.tracking import IngestionTracker, Source
from exporter.uploads import UploadStore


def tracker(added: list[str], removed: list[str]) -> IngestionTracker:
    return IngestionTracker(
        UploadStore(),
        max_tracked=10_000,
        label_names=(),
        on_added=added.extend,
        on_removed=removed.extend,
        on_rejected=lambda reason: None,
    )


def tracked(t: IngestionTracker) -> dict[str, tuple[str, ...]]:
    """Every tracked id and its sources, read as the admin API lists them (one page)."""
    return {v.ingestion_id: v.sources for v in t.page(None, 1_000_000, frozenset(), 0).views}


@pytest.mark.parametrize("seed", range(20))
async def test_a_reload_applying_the_difference_ends_where_a_full_replacement_does(
    seed: int,
) -> None:
    """Random old and new id lists, some ids also held by the admin API: the reload path
    (`previous` given) leaves the same uploads, sources and callbacks as the full path."""
    rng = random.Random(seed)
    universe = [f"id-{i}" for i in range(60)]
    old = rng.sample(universe, rng.randrange(0, 40))
    new = rng.sample(universe, rng.randrange(0, 40))
    api_held = rng.sample(universe, 10)
    outcomes = []
    for previous in (None, old):
        added: list[str] = []
        removed: list[str] = []
        t = tracker(added, removed)
        t.replace_config_ids(old)
        for ingestion_id in api_held:
            assert (await t.register(ingestion_id, Source.API)).accepted
        added.clear()
        change = t.replace_config_ids(new, previous=previous)
        outcomes.append((tracked(t), sorted(added), sorted(removed), change))
    assert outcomes[0] == outcomes[1]
    full_tracked, _, full_removed, change = outcomes[0]
    assert set(full_tracked) == set(new) | set(api_held)  # the oracle is the sets themselves
    assert sorted(full_removed) == sorted(set(old) - set(new) - set(api_held))
    assert change.removed == len(set(old) - set(new))


def test_a_reload_with_the_same_ids_changes_nothing() -> None:
    """The usual reload (labels, limits): no id added or removed, no callback."""
    added: list[str] = []
    removed: list[str] = []
    t = tracker(added, removed)
    ids = [f"id-{i}" for i in range(100)]
    t.replace_config_ids(ids)
    added.clear()
    change = t.replace_config_ids(list(ids), previous=ids)
    assert (change.added, change.removed, added, removed) == (0, 0, [], [])
    assert set(tracked(t)) == set(ids)
