"""create_app() and its lifespan: load the backbone once, open the store, start the engine loop, stop it."""

from __future__ import annotations

import gc
import logging
import socket
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response

from prefix_store.cache import PrefixCache
from prefix_store.store import open_store
from server.auth import KnownKeys
from server.door import Door
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.kv_cache import available_memory, kv_budget
from server.engine.transfer import stage, upload
from server.errors import FastJSONResponse, error_response, install_error_handlers
from server.front import FrontMiddleware
from server.metrics import Metrics
from server.prompts import Prompts
from server.quotas import Quotas
from server.settings import Settings, get_settings

log = logging.getLogger("prefixserve")


def build_state(settings: Settings) -> SimpleNamespace:
    """Everything the handlers share: settings, store, device cache, engine, metrics."""
    state = SimpleNamespace(
        settings=settings, store=None, cache=None, engine=None, metrics=None, draining=False, num_starting=0
    )
    state.metrics = Metrics(state)
    state.known_keys = KnownKeys(settings.key_grace_seconds)
    state.door = Door()
    # --runner-process: the forward passes run in a child that loads the weights; this process needs the
    # backbone's shape, tokenizer and rules only
    backbone = load_backbone(
        settings.model, settings.device, settings.dtype, weights=not settings.runner_process
    )
    state.store = open_store(settings.store, settings.store_timeout, grace_seconds=settings.key_grace_seconds)
    state.quotas = Quotas(state.store)
    runner = _runner_process(settings, state.metrics.on_forward) if settings.runner_process else None
    if runner is not None:
        backbone.rules = runner.rules  # the generation rules of the loaded model (the same files)
    config = EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_model_len=settings.max_model_len,
        max_prefix_tokens=settings.max_prefix_tokens,
        max_queue=settings.max_queue,
        policy=settings.scheduling,
        kv_cache_bytes=runner.kv_plan.budget_bytes if runner is not None else _kv_budget(settings, backbone),
        max_step_seconds=settings.max_step_seconds,
        cuda_graphs=settings.cuda_graphs,
        overlap=settings.overlap_steps,
        kv_layout=settings.kv_layout,
        kv_block_size=settings.kv_block_size,
    )
    state.engine = Engine(
        backbone,
        config,
        release_prefix=lambda prefix: state.cache.release(prefix),
        on_forward=state.metrics.on_forward,
        runner=runner,
    )
    # --runner-process: the weights are not here; prefixes stay on the host and cross to the runner's process.
    # --kv-layout paged: the targets the pool holds stay on the host, their blocks are their only device copy
    prefix_device = torch.device("cpu") if settings.runner_process else backbone.device
    pooled: frozenset[str] = getattr(state.engine.runner, "pooled_targets", frozenset())
    state.cache = PrefixCache(
        state.store, lambda p: _to_device(p, prefix_device, backbone.dtype, pooled), settings.cache_bytes
    )
    if pooled:
        log.info(
            "prefix cache (--cache-bytes) %.1f MiB of host memory: prefixes' %s copied into the KV pool when "
            "they enter it, no device copy kept beside their blocks",
            settings.cache_bytes / 2**20,
            " and ".join(sorted(pooled)),
        )
    state.prompts = Prompts(backbone.tokenizer, backbone.rules.bos_token_id, state.engine.max_model_len)
    log.info("%s", state.engine.runner.kv_plan.describe(settings.max_num_seqs))
    log.info("decode steps: %s", state.engine.runner.decode_mode)
    watch = getattr(state.store, "watch", None)
    if watch is not None:
        watch(
            lambda prefix_id: (
                state.cache.invalidate_all() if prefix_id is None else state.cache.invalidate(prefix_id)
            )
        )
    return state


def _kv_budget(settings: Settings, backbone: Any) -> int:
    """--kv-cache-bytes, or the documented share of the memory left now that the model is loaded (logged), less
    the prefix cache where it lives on the device (not under --kv-layout paged on CUDA: it is on the host)."""
    on_host = settings.kv_layout == "paged" and backbone.device.type == "cuda"
    reserved = 0 if on_host else settings.cache_bytes
    return kv_budget(settings.kv_cache_bytes, reserved, backbone.device, available_memory)


def _runner_process(settings: Settings, on_forward: Any) -> Any:
    from server.engine.worker import RunnerProcess, RunnerSpec

    spec = RunnerSpec(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        max_prefix_tokens=settings.max_prefix_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        prefix_cache_bytes=settings.cache_bytes,
        cuda_graphs=settings.cuda_graphs,
        retain_host_memory=settings.retain_host_memory,
        torch_threads=settings.torch_threads,
        log_level=settings.log_level,
        log_format=settings.log_format,
        kv_layout=settings.kv_layout,
        kv_block_size=settings.kv_block_size,
    )
    runner = RunnerProcess(spec, on_forward=on_forward)
    log.info("forward passes run in process %d (--runner-process)", runner.pid)
    return runner


def _to_device(
    prefix: Any, device: torch.device, dtype: torch.dtype, pooled: frozenset[str] = frozenset()
) -> dict:
    # runs in a worker thread (PrefixCache.acquire is called through asyncio.to_thread): pinned, non_blocking,
    # on a side stream on CUDA, so the engine's forward is not queued behind the copy. `pooled` targets stay on
    # the host (pinned on CUDA): the paged runner copies them into blocks when the prefix enters the pool
    return {
        k: stage(v, device, dtype) if k in pooled else upload(v, device, dtype)
        for k, v in prefix.targets.items()
    }


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (origin, method or header not allowed) answered in JSON."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        message = f"{bytes(response.body).decode()} (--cors-origins lists the allowed origins)"
        headers = {
            k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")
        }
        return error_response(400, "cors_refused", message, headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.admin_key is None:
            log.warning(
                "!!! PREFIXSERVE_ADMIN_KEY is not set: AUTH IS OFF, every caller is admin. Set it in production."
            )
        state = build_state(settings)
        started = time.monotonic()
        state.engine.warm_up()
        log.info("warm-up step done in %.2f s", time.monotonic() - started)
        for key, value in vars(state).items():
            setattr(app.state, key, value)
        state.engine.start()
        backbone = state.engine.backbone
        if backbone.dtype != torch.float32:
            log.warning(
                "running in %s%s: outputs are close to, not token-identical with, HF/PEFT generate; the "
                "exactness promise holds in float32 (--dtype float32)",
                str(backbone.dtype).removeprefix("torch."),
                " (--dtype auto picks bfloat16 on CUDA)" if settings.dtype == "auto" else "",
            )
        log.info(
            "serving %s (%s, %d layers) on %s/%s; store %s; KV cache %.1f MiB for %d sequences",
            settings.model,
            backbone.model_type,
            backbone.shape.num_layers,
            backbone.device,
            backbone.dtype,
            state.store.url,
            state.engine.runner.cache.num_bytes / 2**20,
            state.engine.config.max_num_seqs,
        )
        # the start-up heap (modules, the model's and tokenizer's objects) lives as long as the server: out of the
        # cyclic collector's scans, whose full passes over it would pause the event loop and every stream
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again once this app stops (tests start many apps in one process)
            state.engine.stop()
            state.prompts.close()
            state.store.close()

    app = FastAPI(
        title="prefixserve",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        default_response_class=FastJSONResponse,
    )
    app.state.settings = settings
    app.state.engine = None
    app.state.draining = False
    replica = settings.replica_name or f"{socket.gethostname()}:{settings.port}"
    app.add_middleware(
        FrontMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        replica=replica,
    )
    if origins := [o.strip() for o in settings.cors_origins.split(",") if o.strip()]:
        app.add_middleware(  # outermost: a browser's preflight is answered before anything else
            JSONCORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "X-Prefixserve-Replica", "Retry-After"],
            max_age=600,
        )
    install_error_handlers(app)

    from server.routes import admin, chat, completions, generate, ops, prefixes, tenants, tokens

    for module in (generate, completions, chat, tokens, prefixes, tenants, ops, admin):
        app.include_router(module.router)
    return app
