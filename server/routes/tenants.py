"""Tenants: keys (admin: create, revoke) and settings (admin: weight and quotas; the tenant may read its own)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from prefix_store.store import InvalidId, StoreUnavailable, check_id_part
from server.auth import AdminPrincipal, CurrentPrincipal, new_key
from server.errors import ServiceError
from server.quotas import TenantSettings

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
    request.app.state.door.forget_key(key_id)
    return Response(status_code=204)


class TenantBody(BaseModel):
    """Any subset of the settings; a field sent as null goes back to its default (weight 1, no limit).
    Strict types: true, "3" or "1e3" are refused, not converted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weight: float | None = Field(
        None, gt=0, le=1000, allow_inf_nan=False, description="fair-share weight (default 1)"
    )
    max_concurrent: int | None = Field(
        None, ge=1, le=1_000_000, description="running + queued requests on one replica"
    )
    requests_per_minute: int | None = Field(None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(None, ge=1, le=10**12, description="prompt + generated tokens")


def _describe(state: Any, tenant: str, settings: TenantSettings) -> dict[str, Any]:
    load = state.engine.tenant_load().get(tenant)
    usage = state.quotas.usage(tenant)
    return {
        "tenant": tenant,
        **settings.to_dict(),
        "usage": {
            "running": load.num_running if load else 0,
            "queued": load.num_waiting if load else 0,
            "requests_last_minute": usage.requests,
            "tokens_last_minute": usage.tokens,
        },
    }


@router.put("/v1/tenants/{tenant}")
async def put_tenant(
    tenant: str, body: TenantBody, request: Request, admin: AdminPrincipal
) -> dict[str, Any]:
    """Set a tenant's weight and quotas (fields not sent keep their value). Answers the settings and usage."""
    tenant = _tenant(tenant)
    state = request.app.state
    try:
        current = await asyncio.to_thread(state.quotas.settings_strict, tenant)
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        if changes.get("weight", 1.0) is None:
            changes["weight"] = 1.0
        settings = dataclasses.replace(current, **changes)
        await asyncio.to_thread(state.quotas.put, tenant, settings)
        state.door.forget_tenant(tenant)  # the new settings apply to the next request here
        return await asyncio.to_thread(_describe, state, tenant, settings)
    except StoreUnavailable as exc:
        raise ServiceError(
            503, "store_unavailable", f"the store is unreachable ({exc}); retry shortly"
        ) from exc


@router.get("/v1/tenants/{tenant}")
async def get_tenant(tenant: str, request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    """A tenant's settings and current usage: the admin key, or that tenant's own key."""
    tenant = _tenant(tenant)
    if not principal.can_manage(tenant):
        raise ServiceError(404, "tenant_not_found", f"no tenant {tenant!r} that this key manages")
    state = request.app.state
    settings = await asyncio.to_thread(state.quotas.settings, tenant)
    return await asyncio.to_thread(_describe, state, tenant, settings)
