"""The device cache: prefixes resident on the serving device, under a byte budget, LRU-evicted. (With the paged
KV layout the server keeps the targets the pool holds on the host here: their device copy is the pool's blocks.)

A request pins its prefix from admission to its last token, so eviction never pulls tensors from under a
running request. A replaced or deleted prefix is invalidated: requests already running finish with the
version they started with, every later request loads the new one. A load that raced with an invalidation
is not inserted (generation counter), so a stale version can never be cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefix_store.format import Prefix, load_prefix
from prefix_store.store import PrefixMeta, PrefixStore


@dataclass(eq=False)
class DevicePrefix:
    """A prefix on the serving device, in the backbone's dtype (the pooled targets on the host: paged layout)."""

    meta: PrefixMeta
    targets: dict[str, torch.Tensor]  # each [num_layers, 2, num_heads, P, head_dim]
    num_bytes: int
    pins: int = 0
    is_resident: bool = field(default=True)  # False once evicted or invalidated

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def num_virtual_tokens(self) -> int:
        return self.meta.num_virtual_tokens


class PrefixNotFound(KeyError):
    pass


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(
        self,
        store: PrefixStore,
        to_device: Callable[[Prefix], dict[str, torch.Tensor]],
        max_bytes: int,
    ):
        self.store = store
        self.to_device = to_device
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, DevicePrefix] = OrderedDict()
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(e.num_bytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, prefix_id: str) -> DevicePrefix:
        """The resident prefix, pinned; loads it from the store on a miss. Raises PrefixNotFound.

        Blocking (store I/O and a host-to-device copy on a miss): call it from a worker thread.
        """
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is not None:
                self._entries.move_to_end(prefix_id)
                entry.pins += 1
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
            generation = self._generation.get(prefix_id, 0)
        loaded = self.store.get(prefix_id)
        if loaded is None:
            raise PrefixNotFound(prefix_id)
        meta, data = loaded
        targets = self.to_device(load_prefix(data))
        entry = DevicePrefix(
            meta=meta, targets=targets, num_bytes=sum(t.numel() * t.element_size() for t in targets.values())
        )
        entry.pins = 1
        with self._lock:
            if self._generation.get(prefix_id, 0) != generation:
                entry.is_resident = False  # replaced meanwhile: serve this request, cache nothing
                return entry
            current = self._entries.get(prefix_id)
            if current is not None:  # another thread loaded the same version first
                current.pins += 1
                return current
            self._entries[prefix_id] = entry
            self._evict_locked()
        return entry

    def acquire_resident(self, prefix_id: str, may_use: Callable[[PrefixMeta], bool]) -> DevicePrefix | None:
        """The prefix pinned if it is resident and `may_use(meta)`, counted as a hit; otherwise None, with
        nothing touched (no store call, no LRU move, no count), so a caller learns nothing it may not use."""
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is None or not may_use(entry.meta):
                return None
            self._entries.move_to_end(prefix_id)
            entry.pins += 1
            self.stats.hits += 1
            return entry

    def pin(self, entry: DevicePrefix) -> None:
        """One more pin on a prefix already pinned (each is released once)."""
        with self._lock:
            entry.pins += 1

    def release(self, entry: DevicePrefix) -> None:
        with self._lock:
            entry.pins -= 1
            self._evict_locked()

    def invalidate(self, prefix_id: str) -> None:
        """Forget a prefix that was replaced or deleted (here or, for shared stores, on another replica)."""
        with self._lock:
            self._generation[prefix_id] = self._generation.get(prefix_id, 0) + 1
            entry = self._entries.pop(prefix_id, None)
            if entry is not None:
                entry.is_resident = False

    def invalidate_all(self) -> None:
        with self._lock:
            for prefix_id in list(self._entries):
                self._generation[prefix_id] = self._generation.get(prefix_id, 0) + 1
                self._entries.pop(prefix_id).is_resident = False

    def resident_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _evict_locked(self) -> None:
        total = sum(e.num_bytes for e in self._entries.values())
        for prefix_id in list(self._entries):
            if total <= self.max_bytes:
                return
            entry = self._entries[prefix_id]
            if entry.pins > 0:
                continue  # in use: over budget until its requests finish
            del self._entries[prefix_id]
            entry.is_resident = False
            total -= entry.num_bytes
            self.stats.evictions += 1
