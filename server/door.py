"""Refusals at the door: a generate whose tenant is refused right now gets its 429 before routing, body or store.

A flooding tenant's refused requests must cost the others little. The full path (server/generation.py) decides
every refusal first; the door only remembers, for MEMORY_SECONDS, which key is whose (with the tenant's
settings read alongside), when a per-minute quota refused that tenant, and when the queue or its max_concurrent
did. For a tenant refused so, it asks the engine again what the full path asks before any work: room in the
queue, the tenant's max_concurrent (a tenant not refused lately is not asked twice). The door never admits: a
request it does not refuse takes the full path, which checks its key in the store as always. So a key revoked
on another replica is refused here with 429 rather than 401 for at most MEMORY_SECONDS, and served never.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from server.auth import KEY_PREFIX
from server.errors import ServiceError
from server.generation import check_room
from server.quotas import TenantSettings

# how long a key's tenant, its settings, or a quota refusal is trusted without the full path checking again
MEMORY_SECONDS = 1.0
MAX_KEYS = 10_000  # keys remembered at once (only keys the store verified; forgotten wholesale when full)
GENERATE_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True)
class _Key:
    tenant: str
    settings: TenantSettings
    seen: float


@dataclass(frozen=True)
class _QuotaRefusal:
    message: str
    until: float  # when a request may pass again (the Retry-After it was given)
    seen: float


class Door:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, _Key] = {}
        self._quota: dict[str, _QuotaRefusal] = {}
        self._no_room: dict[str, float] = {}  # tenant -> when the queue or its max_concurrent last refused it

    def remember_key(self, key: str, tenant: str, settings: TenantSettings) -> None:
        """The full path verified `key` as `tenant`'s in the store and read its settings."""
        if len(self._keys) >= MAX_KEYS:
            self._keys.clear()
        self._keys[key] = _Key(tenant, settings, self.clock())

    def remember_quota(self, tenant: str, message: str, retry_after: int) -> None:
        """The full path refused `tenant` for its per-minute quota, to be retried after `retry_after` s."""
        now = self.clock()
        self._quota[tenant] = _QuotaRefusal(message, now + retry_after, now)

    def remember_no_room(self, tenant: str) -> None:
        """The full path (or the door) refused `tenant` for a full queue or its max_concurrent."""
        self._no_room[tenant] = self.clock()

    def forget_key(self, key_id: str) -> None:
        """A key revoked through this replica: the door stops recognising it at once."""
        for key in [k for k in self._keys if k[len(KEY_PREFIX) :].partition("_")[0] == key_id]:
            del self._keys[key]

    def forget_tenant(self, tenant: str) -> None:
        """New settings for `tenant` (PUT /v1/tenants): the full path reads them on its next request."""
        self._quota.pop(tenant, None)
        self._no_room.pop(tenant, None)
        for key in [k for k, entry in self._keys.items() if entry.tenant == tenant]:
            del self._keys[key]

    def refusal(self, state: Any, scope: dict) -> ServiceError | None:
        """The 429 the full path would give this request now, if the door can tell without its body; else None."""
        if scope["method"] != "POST" or scope["path"] not in GENERATE_PATHS or state.draining:
            return None
        entry = self._keys.get(_bearer(scope["headers"]))
        now = self.clock()
        if entry is None or now - entry.seen > MEMORY_SECONDS:
            return None
        quota = self._quota.get(entry.tenant)
        if quota is not None and now - quota.seen <= MEMORY_SECONDS and now < quota.until:
            state.metrics.tenant_refusals.labels(entry.tenant, "quota_exceeded").inc()
            retry_after = {"Retry-After": str(max(1, math.ceil(quota.until - now)))}
            return ServiceError(429, "quota_exceeded", quota.message, retry_after)
        if now - self._no_room.get(entry.tenant, -MEMORY_SECONDS - 1) > MEMORY_SECONDS:
            return None
        try:
            check_room(state, entry.tenant, entry.settings)  # refreshes the memory when it refuses again
        except ServiceError as exc:
            return exc
        return None


def _bearer(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"authorization":
            text = value.decode("latin-1")
            return text[7:].strip() if text[:7].lower() == "bearer " else ""
    return ""
