"""Copy every prefix and tenant key from one store to another, through the store protocol only.

    python -m prefix_store.copy SRC_URL DST_URL [--overwrite]

URLs are what `prefix-serve --store` takes (a directory, file://DIR, redis://host:port/db). Idempotent: a
prefix the destination already holds in the same version (same sha256 and visibility) is left alone; one
that differs is kept unless --overwrite. Metadata (created_at, updated_at, source, ...) travels unchanged.
Run it with the servers stopped or read-only: prefixes written during the copy may or may not be included.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields

from prefix_store.store import KeyRecord, PrefixMeta, PrefixStore, open_store

PAGE_SIZE = 500


@dataclass
class CopyCounts:
    copied: int = 0
    unchanged: int = 0
    skipped: int = 0  # differs in the destination; kept because --overwrite was not given
    vanished: int = 0  # deleted from the source while copying
    keys_copied: int = 0
    keys_unchanged: int = 0
    keys_skipped: int = 0

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def iter_prefixes(store: PrefixStore) -> Iterator[PrefixMeta]:
    cursor: str | None = None
    while True:
        page, cursor = store.list(limit=PAGE_SIZE, cursor=cursor)
        yield from page
        if cursor is None:
            return


def iter_keys(store: PrefixStore) -> Iterator[KeyRecord]:
    """Every key record. Uses the store's list_keys(); a LocalStore without it is read from its key folder."""
    list_keys = getattr(store, "list_keys", None)
    if list_keys is not None:
        yield from list_keys()
        return
    key_dir = getattr(store, "key_dir", None)
    if key_dir is None:
        raise SystemExit(
            f"{store.url} cannot list its keys; this store type is not supported by the copy tool"
        )
    for path in sorted(key_dir.glob("*.json")):
        record = store.get_key(path.stem)
        if record is not None:
            yield record


def copy_prefixes(src: PrefixStore, dst: PrefixStore, overwrite: bool, counts: CopyCounts) -> None:
    for listed in iter_prefixes(src):
        loaded = src.get(listed.id)
        if loaded is None:
            counts.vanished += 1
            continue
        meta, data = loaded
        meta.extra.pop("data_file", None)  # LocalStore's own bookkeeping; each backend sets its own
        existing = dst.get_meta(meta.id)
        if existing is not None and (existing.sha256, existing.public) == (meta.sha256, meta.public):
            counts.unchanged += 1
        elif existing is not None and not overwrite:
            counts.skipped += 1
            print(
                f"skipped {meta.id}: differs in the destination (pass --overwrite to replace it)",
                file=sys.stderr,
            )
        else:
            dst.put(meta, data)
            counts.copied += 1


def copy_keys(src: PrefixStore, dst: PrefixStore, overwrite: bool, counts: CopyCounts) -> None:
    for record in iter_keys(src):
        existing = dst.get_key(record.key_id)
        if existing == record:
            counts.keys_unchanged += 1
        elif existing is not None and not overwrite:
            counts.keys_skipped += 1
            print(f"skipped key {record.key_id}: differs in the destination", file=sys.stderr)
        else:
            dst.put_key(record)
            counts.keys_copied += 1


def copy_store(src: PrefixStore, dst: PrefixStore, overwrite: bool = False) -> CopyCounts:
    """Copy all prefixes, then all keys, from `src` to `dst`; returns what was done."""
    counts = CopyCounts()
    copy_prefixes(src, dst, overwrite, counts)
    copy_keys(src, dst, overwrite, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefix_store.copy",
        description="Copy every prefix and tenant key between stores (directory <-> Redis, or any pair).",
    )
    parser.add_argument("src", help="source store URL: DIR, file://DIR or redis://host:port/db")
    parser.add_argument("dst", help="destination store URL")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace prefixes and keys that differ in DST"
    )
    args = parser.parse_args(argv)
    src, dst = open_store(args.src), open_store(args.dst)
    try:
        counts = copy_store(src, dst, overwrite=args.overwrite)
    finally:
        src.close()
        dst.close()
    print(f"{src.url} -> {dst.url}: {counts.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
