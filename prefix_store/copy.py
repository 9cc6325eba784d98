"""Copy every prefix and tenant key from one store to another, through the store protocol only.

    python -m prefix_store.copy SRC_URL DST_URL [--overwrite]

URLs are what `prefix-serve --store` takes (a directory, file://DIR, redis://host:port/db). Idempotent: a
prefix the destination already holds in the same version (same sha256 and visibility) is left alone; one
that differs is kept unless --overwrite. Metadata (created_at, updated_at, source, ...) travels unchanged.
Run it with the servers stopped or read-only: prefixes written during the copy may or may not be included.

Afterwards it verifies what it copied: the source's walk against its own count (nothing skipped or repeated),
then every copied prefix read back from the destination (its sha256 and visibility) and every copied key. Any
difference is named on stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

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
    verified: int = 0  # prefixes read back from the destination and found equal

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


@dataclass
class Copied:
    """What the destination must hold once the copy is done: what was copied or found unchanged."""

    walked: list[str] = field(default_factory=list)  # source ids in the order its listing returned them
    prefixes: dict[str, PrefixMeta] = field(default_factory=dict)
    keys: list[KeyRecord] = field(default_factory=list)


class CopyIncomplete(RuntimeError):
    """Verification found the destination short of, or different from, the source."""

    def __init__(self, problems: list[str], counts: CopyCounts):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.counts = counts


def copy_prefixes(
    src: PrefixStore, dst: PrefixStore, overwrite: bool, counts: CopyCounts, copied: Copied
) -> None:
    for listed in iter_prefixes(src):
        copied.walked.append(listed.id)
        loaded = src.get(listed.id)
        if loaded is None:
            counts.vanished += 1
            continue
        meta, data = loaded
        meta.extra.pop("data_file", None)  # LocalStore's own bookkeeping; each backend sets its own
        existing = dst.get_meta(meta.id)
        if existing is not None and (existing.sha256, existing.public) == (meta.sha256, meta.public):
            counts.unchanged += 1
            copied.prefixes[meta.id] = meta
        elif existing is not None and not overwrite:
            counts.skipped += 1
            print(
                f"skipped {meta.id}: differs in the destination (pass --overwrite to replace it)",
                file=sys.stderr,
            )
        else:
            dst.put(meta, data)
            counts.copied += 1
            copied.prefixes[meta.id] = meta


def copy_keys(
    src: PrefixStore, dst: PrefixStore, overwrite: bool, counts: CopyCounts, copied: Copied
) -> None:
    for record in iter_keys(src):
        existing = dst.get_key(record.key_id)
        if existing == record:
            counts.keys_unchanged += 1
            copied.keys.append(record)
        elif existing is not None and not overwrite:
            counts.keys_skipped += 1
            print(f"skipped key {record.key_id}: differs in the destination", file=sys.stderr)
        else:
            dst.put_key(record)
            counts.keys_copied += 1
            copied.keys.append(record)


def _named(what: str, ids: list[str], most: int = 20) -> str:
    shown = ", ".join(ids[:most]) + (f" and {len(ids) - most} more" if len(ids) > most else "")
    return f"{len(ids)} {what}: {shown}"


def check_walk(store: PrefixStore, walked: list[str], role: str, vanished: int = 0) -> list[str]:
    """Problems with a store's listing: ids returned twice, out of order, or fewer than it holds (less those
    that vanished while copying)."""
    problems = []
    repeated = sorted(i for i, n in Counter(walked).items() if n > 1)
    if repeated:
        problems.append(_named(f"prefixes listed more than once by the {role}", repeated))
    if walked != sorted(walked) and not repeated:
        problems.append(f"the {role}'s listing is not in id order")
    held = store.count()
    if held != len(set(walked)) - vanished:
        problems.append(
            f"the {role} holds {held} prefixes but its listing returned {len(set(walked)) - vanished}"
            + (", so some were not copied" if role == "source" else "")
            + " (unless prefixes were written or deleted during the copy)"
        )
    return problems


def verify_copy(src: PrefixStore, dst: PrefixStore, copied: Copied, counts: CopyCounts) -> list[str]:
    """Read back everything that should now be in `dst`; the problems found, none when the copy is whole."""
    problems = check_walk(src, copied.walked, "source", counts.vanished)
    missing, different = [], []
    for prefix_id, meta in copied.prefixes.items():
        loaded = dst.get(prefix_id)
        if loaded is None:
            missing.append(prefix_id)
        elif hashlib.sha256(loaded[1]).hexdigest() != meta.sha256 or loaded[0].sha256 != meta.sha256:
            different.append(f"{prefix_id} (sha256)")
        elif loaded[0].public != meta.public:
            different.append(f"{prefix_id} (visibility)")
        else:
            counts.verified += 1
    if missing:
        problems.append(_named("prefixes missing in the destination", missing))
    if different:
        problems.append(_named("prefixes different in the destination", different))
    dst_walk = [m.id for m in iter_prefixes(dst)]
    problems += check_walk(dst, dst_walk, "destination")
    unlisted = sorted(set(copied.prefixes) - set(dst_walk) - set(missing))
    if unlisted:
        problems.append(_named("copied prefixes the destination does not list", unlisted))
    bad_keys = [r.key_id for r in copied.keys if dst.get_key(r.key_id) != r]
    if bad_keys:
        problems.append(_named("keys missing or different in the destination", bad_keys))
    return problems


def copy_store(src: PrefixStore, dst: PrefixStore, overwrite: bool = False) -> CopyCounts:
    """Copy all prefixes, then all keys, from `src` to `dst`, then verify the destination; returns what was
    done, or raises CopyIncomplete naming what is missing or different."""
    counts, copied = CopyCounts(), Copied()
    copy_prefixes(src, dst, overwrite, counts, copied)
    copy_keys(src, dst, overwrite, counts, copied)
    problems = verify_copy(src, dst, copied, counts)
    if problems:
        raise CopyIncomplete(problems, counts)
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
    except CopyIncomplete as exc:
        print(f"{src.url} -> {dst.url}: {exc.counts.summary()}")
        for problem in exc.problems:
            print(f"copy verification FAILED: {problem}", file=sys.stderr)
        return 1
    finally:
        src.close()
        dst.close()
    print(f"{src.url} -> {dst.url}: {counts.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
