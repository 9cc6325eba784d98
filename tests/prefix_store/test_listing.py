"""Listing on both stores: every prefix exactly once, in id order, at every page size.

Ids hold `-`, `.`, `_`, digits and capitals, which sort around the `/` between tenant and name: a walk in
(tenant, name) order is not id order (`a-b/x` < `a.b/x` < `a/x`), which once made the directory store skip
and repeat prefixes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
import torch

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.redis import RedisStore
from prefix_store.store import PrefixMeta, PrefixStore, make_meta

REDIS_URL = "redis://127.0.0.1:6379/0"
TENANTS = ["a", "a-b", "a.b", "a_b", "a0", "a9", "aB", "ab", "A", "b"]
NAMES = ["x", "x-1", "x.1", "x_1", "x1", "X"]
PUBLIC = {"a-b/x.1", "a_b/X", "ab/x", "b/x-1"}
DATA = save_prefix(Prefix("gpt2", {"decoder": torch.zeros(1, 2, 1, 1, 4)}))


def drop_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))  # tests only; the store never scans
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module", params=["local", "redis"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefixStore]:
    """A store holding every TENANTS x NAMES id (written in reverse order); PUBLIC ones public."""
    if request.param == "local":
        store: PrefixStore = LocalStore(tmp_path_factory.mktemp("listing"))
    else:
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        store = RedisStore(f"{REDIS_URL}?namespace={namespace}")
    for prefix_id in reversed(all_ids()):
        store.put(make_meta(prefix_id, load_prefix(DATA), DATA, "native", prefix_id in PUBLIC), DATA)
    yield store
    store.close()
    if request.param == "redis":
        drop_namespace(namespace)


def all_ids() -> list[str]:
    return sorted(f"{t}/{n}" for t in TENANTS for n in NAMES)


def walk(
    store: PrefixStore, limit: int, tenant: str | None = None, include_public: bool = False
) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list(tenant=tenant, limit=limit, cursor=cursor, include_public=include_public)
        assert len(page) <= limit
        seen += [m.id for m in page]
        if cursor is None:
            return seen


def test_ids_sort_around_the_slash() -> None:
    assert all_ids()[:3] == ["A/X", "A/x", "A/x-1"] and all_ids().index("a-b/x") < all_ids().index("a/x")


@pytest.mark.parametrize("limit", [*range(1, 13), 29, 59, 60, 61, 1000])
def test_walk_returns_every_prefix_once_in_id_order(filled: PrefixStore, limit: int) -> None:
    assert walk(filled, limit) == all_ids()


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7, 100])
@pytest.mark.parametrize("tenant", ["a", "a-b", "a_b", "nobody"])
def test_tenant_walk_with_and_without_public(filled: PrefixStore, tenant: str, limit: int) -> None:
    own = [i for i in all_ids() if i.split("/")[0] == tenant]
    assert walk(filled, limit, tenant) == own
    assert walk(filled, limit, tenant, include_public=True) == sorted(set(own) | PUBLIC)


def test_first_page_is_in_id_order(filled: PrefixStore) -> None:
    page, cursor = filled.list(limit=5)
    assert [m.id for m in page] == all_ids()[:5] and cursor is not None
    assert all(isinstance(m, PrefixMeta) for m in page)


def test_count_matches_the_walk(filled: PrefixStore) -> None:
    assert filled.count() == len(all_ids())


def test_limit_below_one_is_refused(filled: PrefixStore) -> None:
    with pytest.raises(ValueError):
        filled.list(limit=0)
