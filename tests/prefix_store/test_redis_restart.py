"""RedisStore across a Redis crash or pause: our OWN redis-server (never the shared one), killed and started
again, or paused (SIGSTOP) and resumed."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from own_redis import OwnRedis

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.redis import RedisStore
from prefix_store.store import KeyRecord, StoreUnavailable, make_meta


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def make_prefix(seed: int) -> bytes:
    targets = {"decoder": torch.randn(2, 2, 4, 3, 16, generator=torch.Generator().manual_seed(seed))}
    return save_prefix(Prefix(model_type="gpt2", targets=targets))


def put(store: RedisStore, prefix_id: str, seed: int) -> bytes:
    data = make_prefix(seed)
    store.put(make_meta(prefix_id, load_prefix(data), data, "native", False), data)
    return data


def next_event(events: queue.Queue[str | None], timeout: float = 10.0) -> str | None:
    return events.get(timeout=timeout)


def test_crash_loses_no_acknowledged_write_and_store_reconnects(own_redis: OwnRedis) -> None:
    store = RedisStore(own_redis.url)
    other = RedisStore(own_redis.url)  # another replica
    events: queue.Queue[str | None] = queue.Queue()
    try:
        store.watch(events.put)
        assert next_event(events) is None
        written = {f"acme/p{i}": put(store, f"acme/p{i}", i) for i in range(20)}
        for _ in written:
            assert next_event(events) is not None

        own_redis.kill()
        assert store.ping() is False
        with pytest.raises(StoreUnavailable):
            store.get("acme/p0")
        with pytest.raises(StoreUnavailable):
            put(store, "acme/lost", 99)

        own_redis.start()
        # After the restart the watcher resubscribes and says "anything may have changed".
        assert next_event(events, timeout=15) is None
        assert store.ping() is True
        for prefix_id, data in written.items():
            got = store.get(prefix_id)
            assert got is not None and got[1] == data, prefix_id
        page, cursor = store.list(limit=100)
        assert [m.id for m in page] == sorted(written) and cursor is None
        # Both the request path and the change feed work again without new store objects.
        put(other, "acme/after", 7)
        while (event := next_event(events)) is None:
            pass
        assert event == "acme/after"
    finally:
        store.close()
        other.close()


def test_watch_keeps_trying_while_redis_is_down(own_redis: OwnRedis) -> None:
    store = RedisStore(own_redis.url)
    events: queue.Queue[str | None] = queue.Queue()
    try:
        store.watch(events.put)
        assert next_event(events) is None
        own_redis.kill()
        time.sleep(1.5)  # several failed reconnects
        assert events.empty()
        own_redis.start()
        assert next_event(events, timeout=15) is None
    finally:
        closing = threading.Thread(target=store.close)
        closing.start()
        closing.join(timeout=30)  # a ceiling: close() must stop the reconnecting watcher, not hang on it
        assert not closing.is_alive(), "close() did not return while the watcher was reconnecting"


def call_in_thread(fn, *args, ceiling: float = 20.0):
    """fn(*args)'s result or exception; the ceiling only tells a bounded call from a hung one."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(ceiling)
    assert not thread.is_alive(), f"{fn.__name__} still blocked after {ceiling} s on a paused Redis"
    return box[0]


def test_paused_redis_raises_store_unavailable_within_the_timeout_and_heals(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP keeps the connections open but answers nothing: a call waits the timeout once (not redis-py's
    retries of it), the calls after it fail at once but one a second, one ERROR line says so, and SIGCONT
    heals it."""
    caplog.set_level(logging.INFO, logger="prefix_store.redis")
    store = RedisStore(own_redis.url, timeout=0.5)
    record = KeyRecord(key_id="abc123", tenant="acme", key_hash="0" * 64, created_at=1.0)
    try:
        store.put_key(record)
        assert store.get_key("abc123") == record
        own_redis.pause()
        for _ in range(5):
            assert isinstance(call_in_thread(store.get_key, "abc123"), StoreUnavailable)
        assert isinstance(call_in_thread(store.get, "acme/p0"), StoreUnavailable)
        assert call_in_thread(store.ping) is False
        assert store.outage.since is not None and store.outage.num_refused > 0
        unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
        assert len(unreachable) == 1 and unreachable[0].levelno == logging.ERROR, caplog.text
        own_redis.resume()
        deadline = time.monotonic() + 20
        while store.ping() is False and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get_key("abc123") == record
        assert store.outage.since is None
        assert sum("answers again after" in r.getMessage() for r in caplog.records) == 1
    finally:
        own_redis.resume()
        store.close()


def test_watch_drops_the_cache_once_the_feed_is_silent_past_the_grace(own_redis: OwnRedis) -> None:
    """A paused Redis leaves the feed's connection open: the watcher's own PINGs find it silent, and past the
    grace it says "drop everything"; after SIGCONT it resubscribes (None again) and notices flow."""
    store = RedisStore(own_redis.url, timeout=0.5, grace_seconds=1.0)
    other = RedisStore(own_redis.url)
    events: queue.Queue[str | None] = queue.Queue()
    try:
        store.watch(events.put)
        assert next_event(events) is None
        own_redis.pause()
        assert next_event(events, timeout=20) is None  # silent past the grace: drop what was cached
        own_redis.resume()
        assert next_event(events, timeout=20) is None  # resubscribed
        put(other, "acme/after", 3)
        while (event := next_event(events)) is None:
            pass
        assert event == "acme/after"
    finally:
        own_redis.resume()
        store.close()
        other.close()
