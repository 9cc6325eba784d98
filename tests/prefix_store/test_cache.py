"""The device cache: hits, misses, LRU eviction under a byte budget, pins, invalidation races."""

from __future__ import annotations

import pytest
import torch

from prefix_store.cache import PrefixCache, PrefixNotFound
from prefix_store.format import Prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.store import make_meta

ENTRY_BYTES = 2 * 2 * 2 * 3 * 4 * 4  # [2, 2, 2, 3, 4] float32


def put(store: LocalStore, prefix_id: str, value: float = 1.0) -> None:
    prefix = Prefix("gpt2", {"decoder": torch.full((2, 2, 2, 3, 4), value)})
    data = save_prefix(prefix)
    store.put(make_meta(prefix_id, prefix, data, "native", False), data)


def make_cache(tmp_path, num_entries: int) -> tuple[LocalStore, PrefixCache]:
    store = LocalStore(tmp_path)
    return store, PrefixCache(store, lambda p: p.targets, max_bytes=num_entries * ENTRY_BYTES)


def test_hit_miss_and_lru_eviction(tmp_path):
    store, cache = make_cache(tmp_path, 2)
    for name in "abc":
        put(store, f"t/{name}")
    for name in ("a", "b", "a", "c"):  # c evicts b (least recently used), not a
        cache.release(cache.acquire(f"t/{name}"))
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)
    assert sorted(cache.resident_ids()) == ["t/a", "t/c"]
    assert cache.num_bytes <= cache.max_bytes


def test_pinned_prefix_is_not_evicted(tmp_path):
    store, cache = make_cache(tmp_path, 1)
    put(store, "t/a")
    put(store, "t/b")
    pinned = cache.acquire("t/a")
    cache.release(cache.acquire("t/b"))
    assert "t/a" in cache.resident_ids() and pinned.is_resident
    cache.release(pinned)
    assert len(cache) == 1


def test_replaced_prefix_is_never_served_stale(tmp_path):
    store, cache = make_cache(tmp_path, 4)
    put(store, "t/a", 1.0)
    running = cache.acquire("t/a")
    put(store, "t/a", 2.0)
    cache.invalidate("t/a")
    fresh = cache.acquire("t/a")
    assert float(fresh.targets["decoder"][0, 0, 0, 0, 0]) == 2.0
    assert float(running.targets["decoder"][0, 0, 0, 0, 0]) == 1.0  # the running request keeps its version
    assert not running.is_resident


def test_a_load_racing_an_invalidation_is_not_cached(tmp_path):
    store, cache = make_cache(tmp_path, 4)
    put(store, "t/a", 1.0)
    real_get = store.get

    def get_then_replace(prefix_id):
        loaded = real_get(prefix_id)
        put(store, "t/a", 2.0)  # replaced on another replica while we were loading
        cache.invalidate("t/a")
        return loaded

    store.get = get_then_replace
    stale = cache.acquire("t/a")
    store.get = real_get
    assert not stale.is_resident and "t/a" not in cache.resident_ids()
    assert float(cache.acquire("t/a").targets["decoder"][0, 0, 0, 0, 0]) == 2.0


def test_deleted_prefix_is_not_found(tmp_path):
    store, cache = make_cache(tmp_path, 4)
    put(store, "t/a")
    cache.release(cache.acquire("t/a"))
    store.delete("t/a")
    cache.invalidate("t/a")
    with pytest.raises(PrefixNotFound):
        cache.acquire("t/a")


def test_acquire_resident_never_asks_the_store_and_touches_nothing_it_may_not_use(tmp_path):
    """Another tenant's public prefix is served from the cache without the store (so also while it is
    unreachable); a resident prefix the caller may not use is left exactly as it was."""
    store, cache = make_cache(tmp_path, 2)
    put(store, "t/a")
    put(store, "t/b")
    cache.release(cache.acquire("t/a"))
    cache.release(cache.acquire("t/b"))  # LRU order: a, b
    store.get = store.get_meta = None  # type: ignore[method-assign,assignment]  # any store call fails

    def public(meta) -> bool:
        return meta.id == "t/a"

    assert cache.acquire_resident("t/b", public) is None  # resident, not allowed: no pin, no LRU move
    assert cache.acquire_resident("t/missing", public) is None
    assert cache.resident_ids() == ["t/a", "t/b"] and cache.stats.hits == 0
    entry = cache.acquire_resident("t/a", public)
    assert entry is not None and entry.pins == 1 and cache.stats.hits == 1
    assert cache.resident_ids() == ["t/b", "t/a"]
    cache.release(entry)
