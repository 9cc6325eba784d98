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

from prefix_store.copy import CopyIncomplete, copy_store, main
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


def test_ids_around_the_slash_are_all_copied(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hostile run's case: `a-b/x` and `a.b/x` sort before `a/...` as ids; none may be dropped."""
    monkeypatch.setattr("prefix_store.copy.PAGE_SIZE", 7)
    local = LocalStore(tmp_path / "src")
    ids = [f"a/p{i:03d}" for i in range(40)] + ["a-b/x", "a.b/x", "a_b/x", "a0/x", "b/x"]
    written = {prefix_id: put(local, prefix_id, i) for i, prefix_id in enumerate(ids)}
    assert main([str(tmp_path / "src"), redis_url]) == 0
    assert f"copied={len(ids)}, unchanged=0" in capsys.readouterr().out
    shared = RedisStore(redis_url)
    for prefix_id, data in written.items():
        assert (shared.get(prefix_id) or (None, b""))[1] == data, prefix_id
    assert shared.count() == len(ids)
    shared.close()


class Faulty:
    """A store that forwards everything, except the one fault a test gives it."""

    def __init__(self, store: PrefixStore, **faults: object):
        self._store = store
        self.__dict__.update(faults)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_listing_that_skips_fails_the_copy(tmp_path: Path, redis_url: str) -> None:
    local = LocalStore(tmp_path)
    for i in range(5):
        put(local, f"acme/p{i}", i)

    def skipping_list(**kwargs: object) -> tuple[list, str | None]:
        page, cursor = local.list(**kwargs)  # type: ignore[arg-type]
        return [m for m in page if m.id != "acme/p2"], cursor

    shared = RedisStore(redis_url)
    with pytest.raises(CopyIncomplete) as failed:
        copy_store(Faulty(local, list=skipping_list), shared)  # type: ignore[arg-type]
    assert "the source holds 5 prefixes but its listing returned 4" in str(failed.value)
    shared.close()


def test_a_destination_that_loses_or_changes_a_prefix_fails_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    local, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    for i in range(4):
        put(local, f"acme/p{i}", i)

    def lossy_put(meta, data: bytes) -> bool:
        if meta.id == "acme/p1":
            return True  # acknowledged, never stored
        return dst.put(meta, data[:-1] + b" " if meta.id == "acme/p3" else data)

    faulty = Faulty(dst, put=lossy_put)
    monkeypatch.setattr("prefix_store.copy.open_store", lambda url: local if url == "SRC" else faulty)
    assert main(["SRC", "DST"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 1 prefixes missing in the destination: acme/p1" in err
    assert "FAILED: 1 prefixes different in the destination: acme/p3 (sha256)" in err
