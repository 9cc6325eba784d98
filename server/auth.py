"""Keys, tenants, and who may touch what.

Keys look like `psk_<key_id>_<secret>`. Only a SHA-256 of the whole key is stored, in the prefix store
(so every replica knows it), and compared in constant time. The admin key comes from
PREFIXSERVE_ADMIN_KEY; when it is unset, auth is off and every caller is admin.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefix_store.store import KeyRecord, PrefixMeta, StoreUnavailable
from server.errors import ServiceError

KEY_PREFIX = "psk_"


# Whom the admin key's own generations count as (fair share, per-tenant metrics, concurrency): not a valid
# tenant name (one starts with a letter or digit), so a tenant named `admin` keeps a usage of its own.
ADMIN_IDENTITY = "_admin"


@dataclass(frozen=True)
class Principal:
    is_admin: bool
    tenant: str | None  # None for the admin

    @property
    def identity(self) -> str:
        """The tenant whose share and usage this caller's generations count against."""
        return ADMIN_IDENTITY if self.tenant is None else self.tenant

    def can_manage(self, tenant: str) -> bool:
        """PUT/GET/DELETE/list under `tenant`."""
        return self.is_admin or self.tenant == tenant

    def can_generate(self, meta: PrefixMeta) -> bool:
        return self.is_admin or meta.public or meta.tenant == self.tenant


ADMIN = Principal(is_admin=True, tenant=None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant: str) -> tuple[KeyRecord, str]:
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return KeyRecord(key_id=key_id, tenant=tenant, key_hash=hash_key(key), created_at=time.time()), key


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


KEY_GRACE_SECONDS = 600.0


class KnownKeys:
    """Keys this replica verified recently, used only while the store is unreachable.

    Normally every request checks its key in the store (so a revocation anywhere takes effect at once). When the
    store is down, a key verified here within `grace_seconds` (--key-grace-seconds, default KEY_GRACE_SECONDS)
    keeps working, so tenants whose prefixes are resident are still served; a key revoked through this replica
    is forgotten at once.
    """

    def __init__(self, grace_seconds: float = KEY_GRACE_SECONDS) -> None:
        self._records: dict[str, tuple[KeyRecord, float]] = {}
        self.grace_seconds = grace_seconds

    def remember(self, record: KeyRecord) -> None:
        self._records[record.key_id] = (record, time.monotonic())

    def forget(self, key_id: str) -> None:
        self._records.pop(key_id, None)

    def recent(self, key_id: str) -> KeyRecord | None:
        record, seen = self._records.get(key_id, (None, 0.0))
        return record if record is not None and time.monotonic() - seen < self.grace_seconds else None


def authenticate(
    authorization: str | None, admin_key: str | None, store, known: KnownKeys | None = None
) -> Principal:
    if admin_key is None:
        return ADMIN
    if not authorization or not authorization.lower().startswith("bearer "):
        raise _unauthorized("send Authorization: Bearer <key>")
    key = authorization[7:].strip()
    if not key:
        raise _unauthorized("the bearer key is empty; send Authorization: Bearer <key>")
    if hmac.compare_digest(key.encode(), admin_key.encode()):
        return ADMIN
    # psk_<key_id>_<secret>: the key id is hex, the secret is urlsafe base64 and may itself hold "_"
    key_id, _, secret = key[len(KEY_PREFIX) :].partition("_")
    if key.startswith(KEY_PREFIX) and key_id and secret:
        from_store = True
        try:
            record = store.get_key(key_id)
        except StoreUnavailable as exc:
            record, from_store = (known.recent(key_id) if known is not None else None), False
            if record is None:
                raise ServiceError(503, "store_unavailable", f"cannot check the key: {exc}") from exc
        if record is not None and hmac.compare_digest(hash_key(key), record.key_hash):
            if known is not None and from_store:  # only the store renews the grace, not its own use
                known.remember(record)
            return Principal(is_admin=False, tenant=record.tenant)
        if known is not None and from_store and record is None:
            known.forget(key_id)  # revoked elsewhere: not to be accepted again during a later outage
    else:
        hmac.compare_digest(hash_key(key), hash_key(admin_key))  # same work either way
    raise _unauthorized("the key is not valid (revoked, mistyped, or for another deployment)")


def get_principal(request: Request) -> Principal:
    state = request.app.state
    return authenticate(
        request.headers.get("authorization"),
        state.settings.admin_key,
        state.store,
        getattr(state, "known_keys", None),
    )


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise ServiceError(403, "forbidden", "this endpoint needs the admin key")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
