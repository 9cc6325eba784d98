"""RedisStore against the shared test Redis (127.0.0.1:6379), each test in its own key namespace."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import torch

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.redis import RedisStore
from prefix_store.store import InvalidId, KeyRecord, PrefixMeta, StoreUnavailable, make_meta, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_prefix(seed: int = 0, num_tokens: int = 3) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    targets = {"decoder": torch.randn(2, 2, 4, num_tokens, 16, generator=gen)}
    return save_prefix(Prefix(model_type="gpt2", targets=targets))


def put(
    store: RedisStore, prefix_id: str, seed: int = 0, public: bool = False
) -> tuple[PrefixMeta, bytes, bool]:
    data = make_prefix(seed)
    meta = make_meta(prefix_id, load_prefix(data), data, source="native", public=public)
    return meta, data, store.put(meta, data)


def drop_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))  # tests only; the store never scans
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    drop_namespace(name)


@pytest.fixture
def store(namespace: str) -> Iterator[RedisStore]:
    s = open_store(f"{REDIS_URL}?namespace={namespace}")
    assert isinstance(s, RedisStore)
    yield s
    s.close()


def test_put_get_delete_roundtrip(store: RedisStore) -> None:
    meta, data, created = put(store, "acme/summarize", seed=1)
    assert created is True
    got = store.get("acme/summarize")
    assert got is not None
    assert got[0] == meta and got[1] == data
    assert store.get_meta("acme/summarize") == meta
    assert store.get("acme/missing") is None and store.get_meta("acme/missing") is None
    assert store.delete("acme/summarize") is True
    assert store.delete("acme/summarize") is False
    assert store.get("acme/summarize") is None
    assert store.list() == ([], None)


def test_invalid_ids_are_rejected(store: RedisStore) -> None:
    with pytest.raises(InvalidId):
        store.get("no-slash")
    with pytest.raises(InvalidId):
        store.list(tenant="bad tenant")
    with pytest.raises(InvalidId):
        store.list(cursor="_w")  # not UTF-8 once decoded


def test_replace_keeps_created_at_and_swaps_the_whole_version(store: RedisStore) -> None:
    first, _, _ = put(store, "acme/t", seed=1)
    time.sleep(0.01)
    second, data2, created = put(store, "acme/t", seed=2, public=True)
    assert created is False
    assert second.created_at == first.created_at  # put() reports the kept value on the meta it was given
    meta, data = store.get("acme/t") or (None, b"")
    assert meta is not None and data == data2
    assert meta.sha256 == second.sha256 and meta.created_at == first.created_at
    assert meta.updated_at > first.updated_at and meta.public is True


def test_readers_never_pair_old_meta_with_new_bytes(store: RedisStore) -> None:
    versions = [make_prefix(seed) for seed in range(4)]
    metas = [make_meta("acme/race", load_prefix(d), d, "native", False) for d in versions]
    store.put(metas[0], versions[0])
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i = (i + 1) % len(versions)
            store.put(metas[i], versions[i])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 0.5
        reads = 0
        while time.monotonic() < deadline:
            got = store.get("acme/race")
            assert got is not None
            meta, data = got
            if versions.index(data) != [m.sha256 for m in metas].index(meta.sha256):
                errors.append(meta.sha256)
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert reads > 10 and not errors


def test_pagination_visits_every_id_once_in_order(store: RedisStore) -> None:
    ids = sorted(f"t{t}/p{i:03d}" for t in range(3) for i in range(17))
    data = make_prefix(0)
    for prefix_id in ids:
        store.put(make_meta(prefix_id, load_prefix(data), data, "native", False), data)
    for limit in (1, 7, 51, 200):
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page, cursor = store.list(limit=limit, cursor=cursor)
            assert len(page) <= limit
            seen += [m.id for m in page]
            if cursor is None:
                break
        assert seen == ids, limit
    page, cursor = store.list(limit=len(ids))
    assert len(page) == len(ids) and cursor is None


def test_listing_five_thousand_prefixes_is_paged_quickly(store: RedisStore, namespace: str) -> None:
    # Index entries and hashes written directly (pipelined) so the test measures listing, not uploads.
    data = make_prefix(0)
    template = make_meta("x/y", load_prefix(data), data, "native", False)
    client = redis.Redis.from_url(REDIS_URL)
    pipe = client.pipeline(transaction=False)
    ids = sorted(f"tenant{i % 10}/prefix-{i:05d}" for i in range(5000))
    for prefix_id in ids:
        tenant, name = prefix_id.split("/")
        meta = PrefixMeta(**{**template.to_dict(), "id": prefix_id, "tenant": tenant, "name": name})
        store_args = store._prefix_key(prefix_id), *store._index_keys(tenant)
        pipe.hset(store_args[0], mapping={"meta": json.dumps(meta.to_dict()), "data": b"x"})
        pipe.zadd(store_args[1], {prefix_id: 0})
        pipe.zadd(store_args[2], {prefix_id: 0})
    pipe.execute()
    client.close()

    started = time.perf_counter()
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list(limit=100, cursor=cursor)
        seen += [m.id for m in page]
        if cursor is None:
            break
    elapsed = time.perf_counter() - started
    assert seen == ids
    assert elapsed < 60.0  # a ceiling against an O(n) walk per page (about 0.3 s here), not a latency claim
    page, _ = store.list(tenant="tenant3", limit=1000)
    assert [m.id for m in page] == [i for i in ids if i.startswith("tenant3/")]


def test_tenant_filter_and_public(store: RedisStore) -> None:
    put(store, "acme/a")
    put(store, "acme/shared", public=True)
    put(store, "beta/b")
    put(store, "beta/pub", public=True)
    put(store, "zeta/pub", public=True)
    ids = lambda page: [m.id for m in page[0]]  # noqa: E731
    assert ids(store.list(tenant="acme")) == ["acme/a", "acme/shared"]
    assert ids(store.list(tenant="acme", include_public=True)) == [
        "acme/a",
        "acme/shared",
        "beta/pub",
        "zeta/pub",
    ]
    assert ids(store.list(tenant="nobody", include_public=True)) == ["acme/shared", "beta/pub", "zeta/pub"]
    assert ids(store.list()) == ["acme/a", "acme/shared", "beta/b", "beta/pub", "zeta/pub"]
    # paging through the merged view
    seen, cursor = [], None
    while True:
        page, cursor = store.list(tenant="beta", include_public=True, limit=1, cursor=cursor)
        seen += [m.id for m in page]
        if cursor is None:
            break
    assert seen == ["acme/shared", "beta/b", "beta/pub", "zeta/pub"]
    # made private: leaves the public index
    put(store, "beta/pub", public=False)
    assert ids(store.list(tenant="acme", include_public=True)) == ["acme/a", "acme/shared", "zeta/pub"]
    store.delete("zeta/pub")
    assert ids(store.list(tenant="acme", include_public=True)) == ["acme/a", "acme/shared"]


def test_keys(store: RedisStore) -> None:
    record = KeyRecord(key_id="k1", tenant="acme", key_hash="ab" * 32, created_at=1700000000.25)
    store.put_key(record)
    store.put_key(KeyRecord(key_id="k0", tenant="beta", key_hash="cd" * 32, created_at=1.5))
    assert store.get_key("k1") == record
    assert store.get_key("missing") is None and store.get_key("../etc") is None
    assert [r.key_id for r in store.list_keys()] == ["k0", "k1"]
    assert store.delete_key("beta", "k1") is False  # another tenant's key
    assert store.get_key("k1") == record
    assert store.delete_key("acme", "k1") is True
    assert store.get_key("k1") is None and store.delete_key("acme", "k1") is False
    assert [r.key_id for r in store.list_keys()] == ["k0"]


def test_watch_hears_another_replica(store: RedisStore, namespace: str) -> None:
    events: queue.Queue[str | None] = queue.Queue()
    store.watch(events.put)
    assert events.get(timeout=5) is None  # subscribed: "anything may have changed"
    other = RedisStore(f"{REDIS_URL}?namespace={namespace}")
    try:
        put(other, "acme/x")
        assert events.get(timeout=5) == "acme/x"
        other.delete("acme/x")
        assert events.get(timeout=5) == "acme/x"
        other.delete("acme/x")  # nothing deleted: nothing published
        put(other, "acme/y")
        assert events.get(timeout=5) == "acme/y"
    finally:
        other.close()


def test_watch_is_per_namespace(store: RedisStore) -> None:
    events: queue.Queue[str | None] = queue.Queue()
    store.watch(events.put)
    assert events.get(timeout=5) is None
    elsewhere = f"test-{uuid.uuid4().hex[:12]}"
    other = RedisStore(f"{REDIS_URL}?namespace={elsewhere}")
    try:
        put(other, "acme/x")
        put(store, "acme/mine")
        assert events.get(timeout=5) == "acme/mine"
    finally:
        other.close()
        drop_namespace(elsewhere)


def test_unreachable_redis_raises_store_unavailable() -> None:
    # Port 1 on loopback: nothing listens, so connections are refused at once.
    s = RedisStore("redis://:secret@127.0.0.1:1/0")
    try:
        assert s.ping() is False
        raised: list[BaseException] = []

        def get() -> None:
            try:
                s.get("acme/x")
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
                raised.append(exc)

        worker = threading.Thread(target=get)
        worker.start()
        worker.join(timeout=30)  # a ceiling: a refused connection must fail, not retry for minutes
        assert not worker.is_alive() and len(raised) == 1 and isinstance(raised[0], StoreUnavailable), raised
        message = str(raised[0])
        assert "127.0.0.1:1" in message and "unreachable" in message and "secret" not in message
        data = make_prefix(0)
        with pytest.raises(StoreUnavailable):
            s.put(make_meta("acme/x", load_prefix(data), data, "native", False), data)
        with pytest.raises(StoreUnavailable):
            s.list()
        with pytest.raises(StoreUnavailable):
            s.get_key("k1")
    finally:
        s.close()


def test_local_store_has_a_noop_watch(tmp_path: object) -> None:
    """One process owns an embedded store: nothing else changes it, so watch() never calls back."""
    local = open_store(str(tmp_path))
    events: list[str | None] = []
    local.watch(events.append)  # type: ignore[attr-defined]
    data = make_prefix(0)
    local.put(make_meta("acme/x", load_prefix(data), data, "native", False), data)
    assert local.delete("acme/x") is True
    time.sleep(0.2)  # a watcher thread, if there were one, would have reported by now
    local.close()
    assert events == []


def test_listing_skips_an_id_whose_prefix_vanished(store: RedisStore) -> None:
    put(store, "acme/a")
    put(store, "acme/c")
    store.client.zadd(store._index_keys("acme")[0], {"acme/b": 0})  # as if deleted mid-listing
    page, cursor = store.list(limit=2)
    assert [m.id for m in page] == ["acme/a"] and cursor is not None
    page, cursor = store.list(limit=2, cursor=cursor)
    assert [m.id for m in page] == ["acme/c"] and cursor is None
