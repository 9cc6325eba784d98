"""Public prefixes on both stores: a tenant's write or delete never replaces one, even racing a publish.

The check "is the stored prefix public" and the write are one atomic step in each store (a lock in the
directory store, the write script in Redis), so the admin's acknowledged publish is never undone.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.redis import RedisStore
from prefix_store.store import PrefixStore, PublicPrefixError, make_meta

REDIS_URL = "redis://127.0.0.1:6379/0"


def prefix_bytes(value: float) -> bytes:
    return save_prefix(Prefix("gpt2", {"decoder": torch.full((1, 2, 1, 1, 4), value)}))


A, B = prefix_bytes(1.0), prefix_bytes(2.0)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[PrefixStore]:
    if request.param == "local":
        yield LocalStore(tmp_path)
        return
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    shared = RedisStore(f"{REDIS_URL}?namespace={namespace}")
    yield shared
    shared.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def race(*calls: Callable[[], object]) -> list[object]:
    """Run the calls on threads released together; their results (or the exceptions raised), in order."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        start.wait()
        try:
            results[i] = call()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def admin_put(store: PrefixStore, prefix_id: str, data: bytes, public: bool | None) -> bool:
    meta = make_meta(prefix_id, load_prefix(data), data, "native", bool(public))
    return store.put(meta, data, keep_visibility=public is None)


def tenant_put(store: PrefixStore, prefix_id: str, data: bytes) -> bool:
    meta = make_meta(prefix_id, load_prefix(data), data, "native", False)
    return store.put(meta, data, replace_public=False, keep_visibility=True)


def stored(store: PrefixStore, prefix_id: str) -> tuple[bool, bytes]:
    loaded = store.get(prefix_id)
    assert loaded is not None
    return loaded[0].public, loaded[1]


def test_a_tenant_cannot_replace_or_delete_a_public_prefix(store: PrefixStore) -> None:
    admin_put(store, "alpha/pub", A, public=True)
    with pytest.raises(PublicPrefixError):
        tenant_put(store, "alpha/pub", B)
    with pytest.raises(PublicPrefixError):
        store.delete("alpha/pub", delete_public=False)
    assert stored(store, "alpha/pub") == (True, A)
    assert store.delete("alpha/pub") is True  # the admin may


def test_a_replace_that_does_not_say_keeps_the_visibility(store: PrefixStore) -> None:
    admin_put(store, "alpha/v", A, public=True)
    assert admin_put(store, "alpha/v", B, public=None) is False
    assert stored(store, "alpha/v") == (True, B) and store.list(tenant="beta", include_public=True)[0]
    admin_put(store, "alpha/v", A, public=False)
    assert tenant_put(store, "alpha/v", B) is False
    assert stored(store, "alpha/v") == (False, B)
    assert tenant_put(store, "alpha/new", A) is True and stored(store, "alpha/new") == (False, A)
    assert store.delete("alpha/v", delete_public=False) is True
    assert store.delete("alpha/v", delete_public=False) is False


def test_a_publish_racing_a_tenant_write_is_never_undone(store: PrefixStore) -> None:
    for trial in range(60):
        prefix_id = f"alpha/vis{trial}"
        if trial % 2:
            tenant_put(store, prefix_id, B)  # replacing an existing private prefix, or creating one
        admin, tenant = race(
            functools.partial(admin_put, store, prefix_id, A, public=True),
            functools.partial(tenant_put, store, prefix_id, B),
        )
        assert admin in (True, False) and (tenant in (True, False) or isinstance(tenant, PublicPrefixError))
        # either order is fine; either way the publish stands: the tenant came first, or was refused
        assert stored(store, prefix_id) == (True, A), (trial, tenant)
