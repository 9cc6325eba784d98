"""The copy tool, both directions between a directory store and Redis (own namespace on the test Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from prefix_store.copy import copy_store, main
from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.redis import RedisStore
from prefix_store.store import KeyRecord, PrefixStore, make_meta

REDIS_URL = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url() -> Iterator[str]:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield f"{REDIS_URL}?namespace={namespace}"
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def put(store: PrefixStore, prefix_id: str, seed: int, public: bool = False) -> bytes:
    targets = {"decoder": torch.randn(2, 2, 4, 3, 16, generator=torch.Generator().manual_seed(seed))}
    data = save_prefix(Prefix(model_type="gpt2", targets=targets))
    store.put(make_meta(prefix_id, load_prefix(data), data, "native", public), data)
    return data


def fill(store: PrefixStore) -> dict[str, bytes]:
    written = {
        f"t{i % 3}/p{i:04d}": put(store, f"t{i % 3}/p{i:04d}", i, public=i % 5 == 0) for i in range(130)
    }
    store.put_key(KeyRecord(key_id="k1", tenant="t0", key_hash="ab" * 32, created_at=1.5))
    store.put_key(KeyRecord(key_id="k2", tenant="t1", key_hash="cd" * 32, created_at=2.5))
    return written


def assert_same(src: PrefixStore, dst: PrefixStore, written: dict[str, bytes]) -> None:
    for prefix_id, data in written.items():
        a, b = src.get(prefix_id), dst.get(prefix_id)
        assert a is not None and b is not None and b[1] == data
        assert a[0].to_public() == b[0].to_public()  # timestamps and visibility travel unchanged
    assert dst.get_key("k1") == src.get_key("k1") and dst.get_key("k2") == src.get_key("k2")


def test_directory_to_redis_and_back(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("prefix_store.copy.PAGE_SIZE", 7)  # many pages
    local, shared = LocalStore(tmp_path / "a"), RedisStore(redis_url)
    written = fill(local)
    counts = copy_store(local, shared)
    assert (counts.copied, counts.keys_copied, counts.unchanged) == (130, 2, 0)
    assert_same(local, shared, written)
    again = copy_store(local, shared)  # idempotent
    assert (again.copied, again.unchanged, again.keys_copied, again.keys_unchanged) == (0, 130, 0, 2)

    back = LocalStore(tmp_path / "b")
    counts = copy_store(shared, back)
    assert (counts.copied, counts.keys_copied) == (130, 2)
    assert_same(shared, back, written)
    shared.close()


def test_differing_prefixes_need_overwrite(tmp_path: Path, redis_url: str) -> None:
    local, shared = LocalStore(tmp_path), RedisStore(redis_url)
    older = put(local, "acme/a", 1)
    newer = put(shared, "acme/a", 2)
    counts = copy_store(local, shared)
    assert (counts.copied, counts.skipped) == (0, 1)
    assert (shared.get("acme/a") or (None, b""))[1] == newer
    counts = copy_store(local, shared, overwrite=True)
    assert (counts.copied, counts.skipped) == (1, 0)
    assert (shared.get("acme/a") or (None, b""))[1] == older
    shared.close()


def test_command_line(tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    local = LocalStore(tmp_path / "src")
    put(local, "acme/a", 1)
    assert main([str(tmp_path / "src"), redis_url]) == 0
    assert "copied=1" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "prefix_store.copy", redis_url, f"file://{tmp_path / 'dst'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
        timeout=60,
    ).stdout
    assert "copied=1" in out and "keys_copied=0" in out
    assert LocalStore(tmp_path / "dst").get("acme/a") is not None
