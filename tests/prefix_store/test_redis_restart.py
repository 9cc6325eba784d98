"""RedisStore across a Redis crash: our OWN redis-server (never the shared one), killed and started again."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.redis import RedisStore
from prefix_store.store import StoreUnavailable, make_meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server with the durability settings of docker-compose.yml, on a free loopback port."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:  # a missing component fails the test, never skips it
            pytest.fail("redis-server is not installed: scripts/ensure-redis installs it (make test runs it)")
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF already holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


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
