"""Admin: create and revoke tenant keys."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from prefix_store.store import InvalidId, StoreUnavailable, check_id_part
from server.auth import AdminPrincipal, new_key
from server.errors import ServiceError

router = APIRouter(tags=["tenants"])


def _tenant(tenant: str) -> str:
    try:
        return check_id_part(tenant, "tenant")
    except InvalidId as exc:
        raise ServiceError(400, "invalid_tenant", str(exc)) from exc


@router.post("/v1/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, request: Request, admin: AdminPrincipal) -> JSONResponse:
    """A new key for the tenant. The key is shown once; only its hash is stored."""
    record, key = new_key(_tenant(tenant))
    try:
        await asyncio.to_thread(request.app.state.store.put_key, record)
    except StoreUnavailable as exc:
        raise ServiceError(
            503, "store_unavailable", f"the store is unreachable ({exc}); retry shortly"
        ) from exc
    return JSONResponse({"key_id": record.key_id, "key": key, "tenant": record.tenant}, status_code=201)


@router.delete("/v1/tenants/{tenant}/keys/{key_id}", status_code=204)
async def revoke_key(tenant: str, key_id: str, request: Request, admin: AdminPrincipal) -> Response:
    """Revoke a key; it stops working at once on every replica."""
    try:
        deleted = await asyncio.to_thread(request.app.state.store.delete_key, _tenant(tenant), key_id)
    except StoreUnavailable as exc:
        raise ServiceError(
            503, "store_unavailable", f"the store is unreachable ({exc}); retry shortly"
        ) from exc
    except InvalidId:
        deleted = False
    if not deleted:
        raise ServiceError(404, "key_not_found", f"tenant {tenant!r} has no key {key_id!r}")
    request.app.state.known_keys.forget(key_id)
    return Response(status_code=204)
