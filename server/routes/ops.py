"""/healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.auth import authenticate
from server.errors import ServiceError
from server.metrics import PublicView

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (vLLM's, SGLang's and TGI's name for /healthz)."""
    return {"status": "ok"}


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    """prefixserve's version (vLLM's route)."""
    return {"version": request.app.version}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Model loaded, store reachable, engine loop alive and stepping, not draining; 503 with the reason otherwise."""
    state = request.app.state
    if state.engine is None:
        return JSONResponse({"status": "loading", "model": False, "store": False}, status_code=503)
    try:
        store_ok = bool(await asyncio.wait_for(asyncio.to_thread(state.store.ping), 2.0))
    except Exception:
        store_ok = False
    engine_problem = state.engine.health()
    body: dict[str, object] = {
        "status": "ready",
        "model": True,
        "store": store_ok,
        "engine": engine_problem is None,
    }
    if getattr(state, "draining", False):
        body["status"] = "draining"
    elif engine_problem is not None:
        body.update(status="engine_unavailable", reason=engine_problem)
    elif not store_ok:
        body["status"] = "store_unavailable"
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format. Open to scrapers; per-tenant series only with the admin key (or auth off)."""
    state = request.app.state
    registry = state.metrics.registry
    if not await _is_admin(request):
        registry = PublicView(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _is_admin(request: Request) -> bool:
    state = request.app.state
    header = request.headers.get("authorization")
    try:
        return (await asyncio.to_thread(authenticate, header, state.settings.admin_key, state.store)).is_admin
    except ServiceError:
        return False
