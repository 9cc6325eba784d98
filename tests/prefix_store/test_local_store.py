"""The embedded directory store: atomic versions, listing, keys, crash leftovers."""

from __future__ import annotations

import os

import pytest
import torch

from prefix_store.format import Prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.store import InvalidId, KeyRecord, make_meta


def put(store: LocalStore, prefix_id: str, value: float = 1.0, public: bool = False) -> bool:
    prefix = Prefix("gpt2", {"decoder": torch.full((2, 2, 2, 3, 4), value)})
    data = save_prefix(prefix)
    return store.put(make_meta(prefix_id, prefix, data, "native", public), data)


def test_create_replace_get_delete(tmp_path):
    store = LocalStore(tmp_path)
    assert put(store, "acme/a", 1.0) is True
    first = store.get_meta("acme/a")
    assert put(store, "acme/a", 2.0) is False
    meta, data = store.get("acme/a")
    assert meta.created_at == first.created_at and meta.updated_at >= first.updated_at
    assert meta.sha256 != first.sha256 and len(data) == meta.bytes
    assert len(list((tmp_path / "prefixes" / "acme").glob("*.safetensors"))) == 1  # old version removed
    assert store.delete("acme/a") and not store.delete("acme/a")
    assert store.get("acme/a") is None and store.get_meta("acme/a") is None


def test_listing_pages_in_id_order_with_tenant_and_public(tmp_path):
    store = LocalStore(tmp_path)
    ids = [f"t{t}/p{i:02d}" for t in range(3) for i in range(7)]
    for prefix_id in ids:
        put(store, prefix_id, public=prefix_id == "t2/p03")
    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=5, cursor=cursor)
        seen += [m.id for m in page]
        if cursor is None:
            break
    assert seen == sorted(ids)
    page, cursor = store.list(tenant="t1", limit=100)
    assert [m.id for m in page] == [f"t1/p{i:02d}" for i in range(7)] and cursor is None
    page, _ = store.list(tenant="t1", limit=100, include_public=True)
    assert "t2/p03" in [m.id for m in page]
    with pytest.raises(InvalidId):
        store.list(cursor="_w")


@pytest.mark.parametrize("bad", ["../x", "a/b/c", "a", "a/..", "a/.hidden", "a/" + "x" * 65, "a/b c"])
def test_bad_ids_never_touch_the_filesystem(tmp_path, bad):
    store = LocalStore(tmp_path)
    with pytest.raises(InvalidId):
        store.get_meta(bad)


def test_crash_leftovers_are_cleaned_and_old_version_survives(tmp_path):
    store = LocalStore(tmp_path)
    put(store, "acme/a", 1.0)
    tenant_dir = tmp_path / "prefixes" / "acme"
    # a crash after writing the new data file but before the metadata commit, and a stray temp file
    (tenant_dir / "a.deadbeef-0000.safetensors").write_bytes(b"half")
    (tenant_dir / ".a.json.1234.tmp").write_bytes(b"{")
    reopened = LocalStore(tmp_path)
    meta, data = reopened.get("acme/a")
    assert meta.sha256 and len(data) == meta.bytes
    assert sorted(os.listdir(tenant_dir)) == sorted(["a.json", meta.extra["data_file"]])


def test_keys(tmp_path):
    store = LocalStore(tmp_path)
    store.put_key(KeyRecord("abc123", "acme", "h" * 64, 1.0))
    assert store.get_key("abc123").tenant == "acme"
    assert not store.delete_key("other", "abc123")
    assert store.delete_key("acme", "abc123") and store.get_key("abc123") is None
    assert store.get_key("../etc") is None


@pytest.mark.parametrize("bad", ["a\n/b", "a/b\n", "a/b\r"])
def test_trailing_newlines_are_not_ids(tmp_path, bad):
    with pytest.raises(InvalidId):
        LocalStore(tmp_path).get_meta(bad)
