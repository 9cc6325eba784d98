"""The embedded store: a directory, one safetensors file per prefix plus its metadata.

Layout::

    DIR/prefixes/<tenant>/<name>.json                 metadata; names the data file of this version
    DIR/prefixes/<tenant>/<name>.<version>.safetensors the native prefix file
    DIR/keys/<key_id>.json                            tenant keys (hashes only)
    DIR/tenants/<tenant>.json                         tenant settings (weight, quotas)

A write puts the new data file beside the old one, then atomically replaces the metadata (the commit
point), then removes the old data file. A crash at any moment leaves the old or the new version whole;
leftovers (temporary files, unreferenced data files) are cleaned when the store opens. One process owns
a directory; several replicas share a Redis store instead.
"""

from __future__ import annotations

import bisect
import json
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefix_store.records import (
    InvalidId,
    KeyRecord,
    PrefixMeta,
    PublicPrefixError,
    check_id_part,
    decode_cursor,
    encode_cursor,
    split_id,
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers and crashes see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.url = f"file://{self.root.resolve()}"
        self.prefix_dir = self.root / "prefixes"
        self.key_dir = self.root / "keys"
        self.tenant_dir = self.root / "tenants"
        for folder in (self.prefix_dir, self.key_dir, self.tenant_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._clean_leftovers()

    # -- prefixes -------------------------------------------------------------------------------
    def _meta_path(self, prefix_id: str) -> Path:
        tenant, name = split_id(prefix_id)
        return self.prefix_dir / tenant / f"{name}.json"

    def put(
        self, meta: PrefixMeta, data: bytes, *, replace_public: bool = True, keep_visibility: bool = False
    ) -> bool:
        meta_path = self._meta_path(meta.id)
        meta_path.parent.mkdir(exist_ok=True)
        with self._lock:  # the visibility check and the write in one step: a publish cannot slip between
            old = self._read_meta(meta_path)
            if old is not None:
                if old.public and not replace_public:
                    raise PublicPrefixError(meta.id)
                meta.created_at = old.created_at
                if keep_visibility:
                    meta.public = old.public
            data_name = f"{meta.name}.{meta.sha256[:16]}-{secrets.token_hex(4)}.safetensors"
            write_atomic(meta_path.parent / data_name, data)
            record = meta.to_dict()
            record["extra"] = {**meta.extra, "data_file": data_name}
            write_atomic(meta_path, json.dumps(record).encode())
            if old is not None:
                (meta_path.parent / old.extra["data_file"]).unlink(missing_ok=True)
        return old is None

    def _read_meta(self, meta_path: Path) -> PrefixMeta | None:
        try:
            return PrefixMeta.from_dict(json.loads(meta_path.read_bytes()))
        except FileNotFoundError:
            return None

    def get_meta(self, prefix_id: str) -> PrefixMeta | None:
        return self._read_meta(self._meta_path(prefix_id))

    def get(self, prefix_id: str) -> tuple[PrefixMeta, bytes] | None:
        meta_path = self._meta_path(prefix_id)
        with self._lock:
            meta = self._read_meta(meta_path)
            if meta is None:
                return None
            return meta, (meta_path.parent / meta.extra["data_file"]).read_bytes()

    def delete(self, prefix_id: str, *, delete_public: bool = True) -> bool:
        meta_path = self._meta_path(prefix_id)
        with self._lock:
            meta = self._read_meta(meta_path)
            if meta is None:
                return False
            if meta.public and not delete_public:
                raise PublicPrefixError(prefix_id)
            meta_path.unlink()
            (meta_path.parent / meta.extra["data_file"]).unlink(missing_ok=True)
        return True

    def _sorted_ids(self, tenant: str | None) -> list[str]:
        """Prefix ids in id order: the whole id compared as one string, as the cursor is and as Redis orders
        them. Not (tenant, name) order: `-` and `.` sort before `/`, so `a-b/x` comes before `a/x`."""
        tenants = [tenant] if tenant else [p.name for p in self.prefix_dir.iterdir() if p.is_dir()]
        ids = []
        for t in tenants:
            tenant_dir = self.prefix_dir / t
            if tenant_dir.is_dir():
                ids += [f"{t}/{p.stem}" for p in tenant_dir.glob("*.json")]
        return sorted(ids)

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        include_public: bool = False,
    ) -> tuple[list[PrefixMeta], str | None]:
        if limit < 1:
            raise InvalidId("limit must be at least 1")
        after = decode_cursor(cursor)
        if tenant is not None:
            check_id_part(tenant, "tenant")
        scan_all = tenant is None or include_public
        ids = self._sorted_ids(None if scan_all else tenant)
        page: list[PrefixMeta] = []
        for prefix_id in ids[bisect.bisect_right(ids, after) :]:
            meta = self.get_meta(prefix_id)
            if meta is None or (tenant is not None and meta.tenant != tenant and not meta.public):
                continue
            if len(page) == limit:
                return page, encode_cursor(page[-1].id)
            page.append(meta)
        return page, None

    def count(self) -> int:
        """How many prefixes the store holds, counted from the files rather than by paging."""
        return len(self._sorted_ids(None))

    # -- keys -----------------------------------------------------------------------------------
    def put_key(self, record: KeyRecord) -> None:
        check_id_part(record.key_id, "key id")
        write_atomic(self.key_dir / f"{record.key_id}.json", json.dumps(record.__dict__).encode())

    def get_key(self, key_id: str) -> KeyRecord | None:
        try:
            check_id_part(key_id, "key id")
            return KeyRecord(**json.loads((self.key_dir / f"{key_id}.json").read_bytes()))
        except (FileNotFoundError, ValueError):
            return None

    def delete_key(self, tenant: str, key_id: str) -> bool:
        record = self.get_key(key_id)
        if record is None or record.tenant != tenant:
            return False
        (self.key_dir / f"{key_id}.json").unlink(missing_ok=True)
        return True

    # -- tenant settings ------------------------------------------------------------------------
    def put_tenant(self, tenant: str, settings: dict[str, Any]) -> None:
        check_id_part(tenant, "tenant")
        write_atomic(self.tenant_dir / f"{tenant}.json", json.dumps(settings).encode())

    def get_tenant(self, tenant: str) -> dict[str, Any] | None:
        try:
            check_id_part(tenant, "tenant")
            settings = json.loads((self.tenant_dir / f"{tenant}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return settings if isinstance(settings, dict) else None

    # -- operations -----------------------------------------------------------------------------
    def ping(self) -> bool:
        return self.prefix_dir.is_dir() and os.access(self.prefix_dir, os.W_OK)

    def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Nothing to watch: one process owns the directory and sees its own writes."""

    def close(self) -> None:
        pass

    def _clean_leftovers(self) -> None:
        """Remove what a crash mid-write can leave: temporary files and unreferenced data files."""
        for tmp in list(self.root.rglob(".*.tmp")):
            tmp.unlink(missing_ok=True)
        for tenant_dir in (p for p in self.prefix_dir.iterdir() if p.is_dir()):
            referenced = set()
            for meta_path in tenant_dir.glob("*.json"):
                meta = self._read_meta(meta_path)
                if meta is not None:
                    referenced.add(meta.extra.get("data_file"))
            for data_path in tenant_dir.glob("*.safetensors"):
                if data_path.name not in referenced:
                    data_path.unlink(missing_ok=True)
