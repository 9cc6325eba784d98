"""The store protocol and open_store(url), which picks a backend from the URL.

Ids, metadata, key records and cursors live in records.py (re-exported here): the backends import that,
not this module, so there is no import cycle between the protocol and its implementations.
"""

from __future__ import annotations

from typing import Any, Protocol

from prefix_store.local import LocalStore
from prefix_store.records import (
    ID_PART,
    InvalidId,
    KeyRecord,
    PrefixMeta,
    PublicPrefixError,
    StoreUnavailable,
    check_id_part,
    decode_cursor,
    encode_cursor,
    make_meta,
    split_id,
)

__all__ = [
    "ID_PART",
    "InvalidId",
    "KeyRecord",
    "PrefixMeta",
    "PrefixStore",
    "PublicPrefixError",
    "StoreUnavailable",
    "check_id_part",
    "decode_cursor",
    "encode_cursor",
    "make_meta",
    "open_store",
    "split_id",
]


class PrefixStore(Protocol):
    """A backend holding native prefix files, their metadata and tenant keys.

    Implementations: `LocalStore` (a directory) and `RedisStore`. Every write is atomic: a reader sees the
    old version or the new one, never a mix, and a crash mid-write loses nothing acknowledged.
    """

    url: str

    def put(
        self, meta: PrefixMeta, data: bytes, *, replace_public: bool = True, keep_visibility: bool = False
    ) -> bool:
        """Store or replace; returns True when created, False when replaced.

        replace_public=False (a tenant's write): raise PublicPrefixError when the stored prefix is public.
        keep_visibility: a replace keeps the stored visibility (set on `meta`); a new prefix takes meta.public.
        Both are decided in the same atomic step as the write, so a concurrent publish cannot be undone."""

    def get_meta(self, prefix_id: str) -> PrefixMeta | None: ...

    def get(self, prefix_id: str) -> tuple[PrefixMeta, bytes] | None:
        """Metadata and native-file bytes of the same version."""

    def delete(self, prefix_id: str, *, delete_public: bool = True) -> bool:
        """False when there was none; delete_public=False: PublicPrefixError when it is public (atomically)."""

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        include_public: bool = False,
    ) -> tuple[list[PrefixMeta], str | None]:
        """Prefixes ordered by id (the whole id as one string); `tenant` filters (plus public ones if
        include_public); next cursor or None. A walk returns every prefix once, at every page size."""

    def count(self) -> int:
        """How many prefixes the store holds, counted without paging (the copy tool checks its walk by it)."""

    def put_key(self, record: KeyRecord) -> None: ...

    def get_key(self, key_id: str) -> KeyRecord | None: ...

    def delete_key(self, tenant: str, key_id: str) -> bool: ...

    def put_tenant(self, tenant: str, settings: dict[str, Any]) -> None:
        """Store a tenant's settings (weight, quotas) as a JSON-able dict, replacing what was there."""

    def get_tenant(self, tenant: str) -> dict[str, Any] | None:
        """The tenant's stored settings, or None when it has none (the defaults apply)."""

    def ping(self) -> bool: ...

    def close(self) -> None: ...


def open_store(url: str, timeout: float | None = None, grace_seconds: float | None = None) -> PrefixStore:
    """Pick a backend from the URL: a path or file://DIR -> LocalStore; redis://... -> RedisStore, with its
    call `timeout` (seconds; None: its default) and change-feed `grace_seconds` (see RedisStore)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from prefix_store.redis import DEFAULT_TIMEOUT, RedisStore  # the redis client: only when asked for

        return RedisStore(url, timeout=timeout or DEFAULT_TIMEOUT, grace_seconds=grace_seconds)
    path = url[len("file://") :] if url.startswith("file://") else url
    return LocalStore(path)
