"""What /v1/generate and /v1/completions share: resolve the prefix, build the request, run it, stream it."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HttpRequest

from prefix_store.cache import DevicePrefix, PrefixNotFound
from prefix_store.format import apply_template
from prefix_store.store import InvalidId, StoreUnavailable, split_id
from server.auth import Principal
from server.engine.engine import PromptTooLong, QueueFull
from server.engine.request import Request, RequestOutput, SamplingParams
from server.errors import ServiceError
from server.logs import request_id_var

log = logging.getLogger("prefixserve.generation")

_TOKENIZE_LOCK = threading.Lock()


@dataclass
class Generation:
    request: Request
    prefix_id: str | None
    stream: AsyncGenerator[RequestOutput, None]
    started: float = field(default_factory=time.monotonic)


def not_found(prefix_id: str) -> ServiceError:
    return ServiceError(
        404, "prefix_not_found", f"no prefix {prefix_id!r} that this key can use; check the id"
    )


def _store_unavailable(exc: StoreUnavailable) -> ServiceError:
    return ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc}); retry shortly")


async def acquire_prefix(state: Any, principal: Principal, prefix_id: str) -> DevicePrefix:
    try:
        tenant, _ = split_id(prefix_id)
    except InvalidId as exc:
        raise ServiceError(400, "invalid_prefix_id", str(exc)) from exc
    try:
        if not principal.is_admin and tenant != principal.tenant:
            # another tenant's id: only a public prefix may be used. Checked before touching the device
            # cache, so a foreign private prefix is never loaded (no cache churn, no hit/miss hint).
            meta = await asyncio.to_thread(state.store.get_meta, prefix_id)
            if meta is None or not meta.public:
                raise not_found(prefix_id)
        prefix = await asyncio.to_thread(state.cache.acquire, prefix_id)
    except PrefixNotFound:
        raise not_found(prefix_id) from None
    except StoreUnavailable as exc:
        raise _store_unavailable(exc) from exc
    if not principal.can_generate(prefix.meta):
        state.cache.release(prefix)
        raise not_found(prefix_id)
    return prefix


async def start(
    state: Any, principal: Principal, prefix_id: str | None, prompt: str, params: SamplingParams
) -> Generation:
    """Validate and queue a generation. Raises ServiceError (404, 422, 429, 503)."""
    if getattr(state, "draining", False):
        raise ServiceError(
            503, "draining", "this replica is shutting down; retry on another one", {"Retry-After": "1"}
        )
    state.num_starting = getattr(state, "num_starting", 0) + 1  # the drain waits for these too
    try:
        return await _start(state, principal, prefix_id, prompt, params)
    finally:
        state.num_starting -= 1


async def _start(
    state: Any, principal: Principal, prefix_id: str | None, prompt: str, params: SamplingParams
) -> Generation:
    engine = state.engine
    prefix = await acquire_prefix(state, principal, prefix_id) if prefix_id is not None else None
    try:
        if prefix is not None:
            prompt = apply_template(prefix.meta.prompt_template, prompt)
        token_ids = await asyncio.to_thread(_tokenize, engine, prompt)
        engine.check_fits(
            len(token_ids), 0 if prefix is None else prefix.num_virtual_tokens, params.max_new_tokens
        )
        request = engine.add(
            token_ids, params, prefix, prefix_id, principal.tenant or "admin", trace_id=request_id_var.get()
        )
        stream = engine.stream(request)
    except PromptTooLong as exc:
        _release(state, prefix)
        raise ServiceError(422, "prompt_too_long", str(exc)) from exc
    except QueueFull as exc:
        _release(state, prefix)
        raise ServiceError(429, "queue_full", str(exc), {"Retry-After": "1"}) from exc
    except BaseException:
        _release(state, prefix)
        raise
    state.metrics.tenant_requests.labels(principal.tenant or "admin").inc()
    return Generation(request, prefix_id, stream)


def _tokenize(engine: Any, prompt: str) -> list[int]:
    """Off the event loop (a long prompt takes a while), one at a time: a HF fast tokenizer shared by
    threads can fail with "Already borrowed" when calls overlap."""
    with _TOKENIZE_LOCK:
        return engine.tokenize(prompt)


def _release(state: Any, prefix: DevicePrefix | None) -> None:
    if prefix is not None:
        state.cache.release(prefix)


async def outputs(state: Any, gen: Generation) -> AsyncIterator[RequestOutput]:
    """The request's outputs; counts tokens and latency; aborts on timeout or when the consumer goes away."""
    metrics = state.metrics
    tenant = gen.request.tenant or "admin"
    deadline = gen.started + state.settings.request_timeout
    stream = gen.stream
    try:
        while True:
            try:
                output = await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            except TimeoutError:
                state.engine.abort(gen.request.request_id)
                raise ServiceError(
                    504,
                    "timeout",
                    f"generation took over {state.settings.request_timeout:g} s and was aborted",
                ) from None
            if output.error:
                raise ServiceError(500, "engine_error", output.error)
            if output.token_id is not None:
                if output.num_output_tokens == 1:
                    metrics.time_to_first_token.observe(time.monotonic() - gen.started)
                metrics.generated_tokens.inc()
                metrics.tenant_tokens.labels(tenant).inc()
            yield output
            if output.is_finished:
                seconds = time.monotonic() - gen.started
                metrics.request_latency.observe(seconds)
                log.info(
                    "generation %s: prefix %s, %d prompt + %d new tokens, %s, %.3f s",
                    gen.request.request_id,
                    gen.prefix_id,
                    output.num_prompt_tokens,
                    output.num_output_tokens,
                    output.finish_reason,
                    seconds,
                )
                return
    finally:
        await stream.aclose()


async def run_to_end(
    state: Any, gen: Generation, http_request: HttpRequest
) -> tuple[list[int], str, RequestOutput]:
    """Collect a whole generation; a client that disconnects aborts it (its slot frees at the next step)."""

    async def collect() -> tuple[list[int], str, RequestOutput]:
        token_ids: list[int] = []
        text = ""
        last: RequestOutput | None = None
        async for output in outputs(state, gen):
            if output.token_id is not None:
                token_ids.append(output.token_id)
            text += output.text
            last = output
        assert last is not None
        return token_ids, text, last

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await http_request.is_disconnected():
            task.cancel()
            state.engine.abort(gen.request.request_id)
            raise ServiceError(499, "client_closed", "the client disconnected")


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams, or a 422 invalid_sampling saying which value is wrong."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise ServiceError(422, "invalid_sampling", str(exc)) from exc
