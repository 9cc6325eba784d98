"""PUT/GET/DELETE /v1/prefixes/{tenant}/{name} and GET /v1/prefixes: upload, inspect, list, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from prefix_store.format import (
    PrefixFormatError,
    apply_template,
    import_peft,
    load_prefix,
    save_prefix,
    validate,
)
from prefix_store.store import InvalidId, PublicPrefixError, StoreUnavailable, check_id_part, make_meta
from server import generation
from server.auth import CurrentPrincipal, Principal
from server.engine.engine import PromptTooLong
from server.errors import ServiceError

router = APIRouter(tags=["prefixes"])


def _check_ids(tenant: str, name: str) -> str:
    try:
        check_id_part(tenant, "tenant")
        check_id_part(name, "name")
    except InvalidId as exc:
        raise ServiceError(400, "invalid_prefix_id", str(exc)) from exc
    return f"{tenant}/{name}"


def _not_found(prefix_id: str) -> ServiceError:
    return ServiceError(404, "prefix_not_found", f"no prefix {prefix_id!r} under a tenant this key manages")


async def _store_call(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except StoreUnavailable as exc:
        raise ServiceError(
            503, "store_unavailable", f"the prefix store is unreachable ({exc}); retry shortly"
        ) from exc


async def _check_room(engine: Any, prefix: Any) -> None:
    """Refuse a prefix (or prompt template) that leaves no room for a one-character source and one new
    token on this backbone: every request with it would be refused."""
    token_ids = await asyncio.to_thread(
        generation.tokenize, engine, apply_template(prefix.prompt_template, "x")
    )
    try:
        engine.check_fits(len(token_ids), prefix.num_virtual_tokens, 1)
    except PromptTooLong:
        template = (
            "" if prefix.prompt_template is None else f" and its prompt template ({len(token_ids)} tokens)"
        )
        raise PrefixFormatError(
            "no_room_for_prompt",
            f"this prefix ({prefix.num_virtual_tokens} virtual tokens){template} leaves no room for a prompt "
            f"and an answer within this backbone's {engine.max_model_len} positions; use a shorter prefix "
            "or template",
        ) from None


async def _parse_upload(request: Request, state: Any) -> tuple[Any, str]:
    """The uploaded prefix, validated, and its source: a native file (octet-stream) or a PEFT adapter (multipart).

    Parsing reads safetensors only (never pickle) and runs off the event loop."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=4)
        parts = {}
        for key in ("adapter_model", "adapter_config"):
            part = form.get(key)
            if part is None:
                raise ServiceError(
                    422,
                    "missing_part",
                    f"multipart upload needs parts adapter_model and adapter_config; {key} is missing",
                )
            parts[key] = await part.read() if hasattr(part, "read") else str(part).encode()
        prefix = await asyncio.to_thread(
            import_peft,
            parts["adapter_config"],
            parts["adapter_model"],
            state.engine.backbone.shape.model_type,
        )
        source = "peft"
    elif content_type in ("application/octet-stream", ""):
        prefix, source = await asyncio.to_thread(load_prefix, await request.body()), "native"
    else:
        raise ServiceError(
            415,
            "unsupported_media_type",
            "send a native prefix file as application/octet-stream, or a PEFT adapter as multipart/form-data",
        )
    settings = state.settings
    await asyncio.to_thread(
        validate, prefix, state.engine.backbone.shape, settings.max_prefix_tokens, settings.max_prefix_value
    )
    await _check_room(state.engine, prefix)
    return prefix, source


# The body is read by hand (raw bytes or multipart); declared here so the OpenAPI document tells clients.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_model", "adapter_config"],
                    "properties": {
                        "adapter_model": {"type": "string", "format": "binary"},
                        "adapter_config": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


@router.put("/v1/prefixes/{tenant}/{name}", status_code=201, openapi_extra=UPLOAD_BODY)
async def put_prefix(
    tenant: str, name: str, request: Request, principal: CurrentPrincipal, public: bool | None = None
) -> JSONResponse:
    """Upload or replace a prefix (201 created, 200 replaced). Validated against the backbone first.

    `public` (admin only) sets visibility; when it is not sent, a replaced prefix keeps its visibility."""
    prefix_id = _check_ids(tenant, name)
    state = request.app.state
    if not principal.can_manage(tenant):
        raise _not_found(prefix_id)
    if public and not principal.is_admin:
        raise ServiceError(403, "forbidden", "only the admin key may upload public prefixes (?public=true)")
    try:
        prefix, source = await _parse_upload(request, state)
    except PrefixFormatError as exc:
        raise ServiceError(422, exc.code, exc.message) from exc
    data = save_prefix(prefix)
    meta = make_meta(prefix_id, prefix, data, source, bool(public))
    try:
        # the store checks visibility and writes in one step: a publish racing this write is never undone
        created = await _store_call(
            state.store.put, meta, data, replace_public=principal.is_admin, keep_visibility=public is None
        )
    except PublicPrefixError:
        raise ServiceError(
            403, "forbidden", "public prefixes can only be replaced by the admin key"
        ) from None
    state.cache.invalidate(prefix_id)
    # the version written (the store set its created_at and kept visibility), not a later writer's
    return JSONResponse(meta.to_public(), status_code=201 if created else 200)


@router.get("/v1/prefixes/{tenant}/{name}")
async def get_prefix(tenant: str, name: str, request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    prefix_id = _check_ids(tenant, name)
    if not principal.can_manage(tenant):
        raise _not_found(prefix_id)
    meta = await _store_call(request.app.state.store.get_meta, prefix_id)
    if meta is None:
        raise _not_found(prefix_id)
    return meta.to_public()


@router.delete("/v1/prefixes/{tenant}/{name}", status_code=204)
async def delete_prefix(tenant: str, name: str, request: Request, principal: CurrentPrincipal) -> Response:
    prefix_id = _check_ids(tenant, name)
    state = request.app.state
    if not principal.can_manage(tenant):
        raise _not_found(prefix_id)
    try:
        deleted = await _store_call(state.store.delete, prefix_id, delete_public=principal.is_admin)
    except PublicPrefixError:
        raise ServiceError(403, "forbidden", "public prefixes can only be deleted by the admin key") from None
    if not deleted:
        raise _not_found(prefix_id)
    state.cache.invalidate(prefix_id)
    return Response(status_code=204)


def _list_scope(principal: Principal, tenant: str | None) -> str | None:
    if tenant is not None:
        try:
            check_id_part(tenant, "tenant")
        except InvalidId as exc:
            raise ServiceError(400, "invalid_tenant", str(exc)) from exc
    if principal.is_admin:
        return tenant
    if tenant is not None and tenant != principal.tenant:
        raise ServiceError(404, "tenant_not_found", f"no tenant {tenant!r} that this key manages")
    return principal.tenant


@router.get("/v1/prefixes")
async def list_prefixes(
    request: Request,
    principal: CurrentPrincipal,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    """One page of prefixes ordered by id; pass next_cursor back for the next page."""
    scope = _list_scope(principal, tenant)
    try:
        page, next_cursor = await _store_call(request.app.state.store.list, scope, limit, cursor)
    except InvalidId as exc:
        raise ServiceError(400, "invalid_cursor", str(exc)) from exc
    return {"prefixes": [m.to_public() for m in page], "next_cursor": next_cursor}
