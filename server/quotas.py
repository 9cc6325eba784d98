"""Per-tenant settings (fair-share weight, quotas) and the per-minute usage they are checked against.

Settings live in the prefix store, so every replica reads the same. Usage per minute is counted in
Redis when the store is Redis (so requests_per_minute / tokens_per_minute hold across replicas), and in
this process with the embedded store (one replica owns it). "The last minute" is the usual sliding-window
estimate: this minute's count plus the previous minute's, weighted by how much of it is still inside the
window. max_concurrent counts this replica's running + queued requests of the tenant.

When the store cannot be reached, the last settings read are used and usage is not counted: quotas fail
open rather than refusing tenants whose prefixes are resident (the same choice as for keys).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from prefix_store.store import StoreUnavailable

log = logging.getLogger("prefixserve.quotas")

WINDOW = 60  # seconds


@dataclass(frozen=True)
class TenantSettings:
    """What PUT /v1/tenants/{tenant} sets. None = no limit."""

    weight: float = 1.0
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TenantSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    requests: int  # in the last minute (sliding estimate)
    tokens: int
    seconds_to_next_minute: float
    previous_weight: float  # share of the previous minute still inside the window
    previous: tuple[int, int]


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class LocalCounts:
    """Minute windows in this process (the embedded store)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        self._lock = threading.Lock()

    def add_usage(self, tenant: str, minute: int, requests: int, tokens: int) -> tuple[int, int]:
        with self._lock:
            counts = self._counts[(tenant, minute)]
            counts[0] += requests
            counts[1] += tokens
            for key in [k for k in self._counts if k[1] < minute - 2]:  # keep three minutes
                del self._counts[key]
            return counts[0], counts[1]

    def get_usage(self, tenant: str, minutes: list[int]) -> list[tuple[int, int]]:
        with self._lock:
            return [tuple(self._counts.get((tenant, m), (0, 0))) for m in minutes]  # type: ignore[misc]


class Quotas:
    def __init__(self, store: Any, clock=time.time):
        self.store = store
        # Redis counts across replicas; the embedded store counts in this process
        self.counts = store if hasattr(store, "add_usage") else LocalCounts()
        self.clock = clock
        self._known: dict[str, TenantSettings] = {}

    def settings_strict(self, tenant: str) -> TenantSettings:
        """The tenant's settings from the store (StoreUnavailable when it cannot be reached)."""
        settings = TenantSettings.from_dict(self.store.get_tenant(tenant))
        self._known[tenant] = settings
        return settings

    def settings(self, tenant: str) -> TenantSettings:
        """The tenant's settings from the store; the last ones read if the store is unreachable."""
        try:
            return self.settings_strict(tenant)
        except StoreUnavailable:
            return self._known.get(tenant, TenantSettings())

    def put(self, tenant: str, settings: TenantSettings) -> None:
        self.store.put_tenant(tenant, settings.to_dict())
        self._known[tenant] = settings

    def usage(self, tenant: str) -> Usage:
        now = self.clock()
        minute = int(now // WINDOW)
        into = now - minute * WINDOW
        try:
            (cur_r, cur_t), previous = self.counts.get_usage(tenant, [minute, minute - 1])
        except StoreUnavailable:
            (cur_r, cur_t), previous = (0, 0), (0, 0)
        weight = (WINDOW - into) / WINDOW
        return Usage(
            requests=cur_r + math.floor(previous[0] * weight),
            tokens=cur_t + math.floor(previous[1] * weight),
            seconds_to_next_minute=WINDOW - into,
            previous_weight=weight,
            previous=previous,
        )

    def count(self, tenant: str, requests: int = 0, tokens: int = 0) -> None:
        if not requests and not tokens:
            return
        try:
            self.counts.add_usage(tenant, int(self.clock() // WINDOW), requests, tokens)
        except StoreUnavailable as exc:
            log.debug("usage of tenant %s not counted: %s", tenant, exc)  # the store logs its outage once

    def check_concurrent(self, tenant: str, settings: TenantSettings, num_active: int) -> None:
        """Raise QuotaExceeded if one more request would go over max_concurrent."""
        if settings.max_concurrent is not None and num_active >= settings.max_concurrent:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {num_active} requests running or queued on this replica; its "
                f"max_concurrent is {settings.max_concurrent}. Wait for one to finish",
                1,
            )

    def admit(self, tenant: str, settings: TenantSettings) -> bool:
        """Count one request against the per-minute quotas, or raise QuotaExceeded (then it is not counted).

        Counting and checking are one atomic increment, so a burst of concurrent requests cannot all pass
        under the limit. Returns False when nothing could be counted (store unreachable: fail open)."""
        now = self.clock()
        minute = int(now // WINDOW)
        try:
            ((prev_requests, prev_tokens),) = self.counts.get_usage(tenant, [minute - 1])
            num_requests, num_tokens = self.counts.add_usage(tenant, minute, 1, 0)
        except StoreUnavailable as exc:
            log.debug("usage of tenant %s not counted: %s", tenant, exc)  # the store logs its outage once
            return False
        weight = (WINDOW - (now - minute * WINDOW)) / WINDOW
        usage = Usage(
            requests=num_requests - 1 + math.floor(prev_requests * weight),  # before this request
            tokens=num_tokens + math.floor(prev_tokens * weight),
            seconds_to_next_minute=WINDOW * weight,
            previous_weight=weight,
            previous=(prev_requests, prev_tokens),
        )
        for what, limit, index in (
            ("requests", settings.requests_per_minute, 0),
            ("tokens", settings.tokens_per_minute, 1),
        ):
            used = usage.requests if index == 0 else usage.tokens
            if limit is not None and used >= limit:
                self.count(tenant, requests=-1)  # refused: give the place back
                raise QuotaExceeded(
                    f"tenant {tenant!r} used {used} {what} in the last minute; its {what}_per_minute is "
                    f"{limit}. Retry after the Retry-After seconds",
                    _retry_after(usage, used, limit, index),
                )
        return True


def _retry_after(usage: Usage, used: int, limit: int, index: int) -> int:
    """Seconds until the sliding estimate drops under the limit (the current minute's count stays until it ends)."""
    current = used - math.floor(usage.previous[index] * usage.previous_weight)
    if current >= limit or usage.previous[index] == 0:
        return max(1, math.ceil(usage.seconds_to_next_minute))
    # previous * (window - into - t) / window < limit - current
    wait = usage.seconds_to_next_minute - WINDOW * (limit - current) / usage.previous[index]
    return max(1, math.ceil(wait))
