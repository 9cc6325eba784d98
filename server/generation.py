"""What the generation routes share: resolve the prefix, build the request, run it, read its outputs."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import Request as HttpRequest
from pydantic import Field

from prefix_store.cache import DevicePrefix, PrefixNotFound
from prefix_store.store import InvalidId, PrefixMeta, StoreUnavailable, split_id
from server.auth import ADMIN_IDENTITY, Principal, authenticate, needs_store
from server.engine.engine import EngineUnavailable, PromptTooLong, QueueFull
from server.engine.request import Request, RequestOutput, SamplingParams
from server.errors import ServiceError
from server.logs import new_request_id, request_id_var
from server.quotas import QuotaExceeded, TenantSettings

log = logging.getLogger("prefixserve.generation")

MAX_STOP_STRINGS = 16
StopString = Annotated[str, Field(max_length=1000, description="generation stops before this text")]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


@dataclass(frozen=True)
class Encoding:
    """What a prompt is tokenized from: a template (None: the text is the whole prompt), the text that fills
    it, and whether special tokens the text spells are read as those tokens."""

    template: str | None
    text: str
    special_tokens: bool
    # False: the text already holds what the tokenizer would add around it (a chat template's rendering)
    add_special_tokens: bool = True


# a prompt: the source that the prefix's prompt template takes, or a function of that template (None without
# one) giving what to tokenize (a chat conversation); it raises ServiceError when it cannot make one
Prompt = str | Callable[[str | None], Encoding]


@dataclass(frozen=True)
class Caller:
    """Who calls, and a tenant's settings read with its key (None for the admin)."""

    principal: Principal
    settings: TenantSettings | None


async def identify(request: HttpRequest) -> Caller:
    """The caller and its tenant's settings, in one trip off the event loop for both store reads (none when
    the store is not needed: auth off, the admin key, a refused header)."""
    state = request.app.state
    header = request.headers.get("authorization")
    admin_key = state.settings.admin_key
    if header is None or not needs_store(header, admin_key):
        return Caller(authenticate(header, admin_key, state.store), None)
    return await asyncio.to_thread(_identify, state, header)


def _identify(state: Any, header: str) -> Caller:
    principal = authenticate(
        header, state.settings.admin_key, state.store, getattr(state, "known_keys", None)
    )
    if principal.tenant is None:
        return Caller(principal, None)
    settings = state.quotas.settings(principal.tenant)
    state.door.remember_key(header[7:].strip(), principal.tenant, settings)  # refusals now cost less
    return Caller(principal, settings)


@dataclass
class Generation:
    request: Request
    prefix_id: str | None
    stream: AsyncGenerator[list[RequestOutput], None]  # Engine.stream_batches
    started: float = field(default_factory=time.monotonic)
    counts_usage: bool = True  # tenants' tokens count against their quotas; the admin's do not


def not_found(prefix_id: str) -> ServiceError:
    return ServiceError(
        404, "prefix_not_found", f"no prefix {prefix_id!r} that this key can use; check the id"
    )


def _store_unavailable(exc: StoreUnavailable) -> ServiceError:
    return ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc}); retry shortly")


# A stored record's metadata as the store keeps it: read and parsed when another tenant's id is missing (public_meta)
_STAND_IN = json.dumps(
    PrefixMeta(
        id="tenant/name", tenant="tenant", name="name", num_virtual_tokens=1, bytes=1, dtype="float32",
        sha256="0" * 64, source="native", targets=["decoder"], public=False, created_at=0.0, updated_at=0.0,
        model_type="gpt2", prompt_template=" {source} <|endoftext|>", extra={"data_file": "name.safetensors"},
    ).to_dict()
)  # fmt: skip


def public_meta(store: Any, prefix_id: str) -> PrefixMeta | None:
    """Another tenant's prefix, when it is public. A missing id reads and parses a stand-in record from a file,
    the work a private one costs, so the time of the 404 does not tell whether another tenant has a prefix
    by that name."""
    meta = store.get_meta(prefix_id)
    if meta is None:
        PrefixMeta.from_dict(json.loads(_stand_in_path().read_bytes()))
        return None
    return meta if meta.public else None


@functools.cache
def _stand_in_path() -> Path:
    fd, name = tempfile.mkstemp(prefix="prefixserve-stand-in-", suffix=".json")
    os.write(fd, _STAND_IN.encode())
    os.close(fd)
    atexit.register(os.unlink, name)
    return Path(name)


async def acquire_prefix(state: Any, principal: Principal, prefix_id: str) -> DevicePrefix:
    try:
        tenant, _ = split_id(prefix_id)
    except InvalidId as exc:
        raise ServiceError(400, "invalid_prefix_id", str(exc)) from exc
    try:
        if not principal.is_admin and tenant != principal.tenant:
            # another tenant's id: only a public prefix may be used. A resident public one is served as is,
            # like one's own (the change feed keeps it current; no store round trip, so it is served while
            # the store is unreachable too). Otherwise the store says before the device cache is touched, so
            # a foreign private prefix is never loaded (no cache churn, no hit/miss hint).
            resident = state.cache.acquire_resident(prefix_id, lambda meta: meta.public)
            if resident is not None:
                return resident
            if await asyncio.to_thread(public_meta, state.store, prefix_id) is None:
                raise not_found(prefix_id)
        # resident (the usual case): pinned here, without a hop to a worker thread; a miss loads it in one
        prefix = state.cache.acquire_resident(prefix_id, _any_meta) or await asyncio.to_thread(
            state.cache.acquire, prefix_id
        )
    except PrefixNotFound:
        raise not_found(prefix_id) from None
    except StoreUnavailable as exc:
        raise _store_unavailable(exc) from exc
    if not principal.can_generate(prefix.meta):
        state.cache.release(prefix)
        raise not_found(prefix_id)
    return prefix


def _any_meta(meta: PrefixMeta) -> bool:
    return True


def _refuse(state: Any, tenant: str, code: str, message: str, retry_after: int) -> ServiceError:
    state.metrics.tenant_refusals.labels(tenant, code).inc()
    return ServiceError(429, code, message, {"Retry-After": str(retry_after)})


async def _admit(
    state: Any, principal: Principal, tenant: str, settings: TenantSettings | None
) -> tuple[TenantSettings, bool]:
    """The tenant's weight and quotas, and whether this request was counted against its per-minute quotas
    (refused with 429 quota_exceeded if it goes over them). The admin has no quotas."""
    if principal.is_admin:
        return TenantSettings(), False
    if settings is not None and not settings.has_rate_quotas:
        return settings, False
    try:
        if settings is not None and state.quotas.counts_here:  # nothing to wait for: no thread
            return settings, state.quotas.admit(tenant, settings)
        return await asyncio.to_thread(_settings_and_admit, state.quotas, tenant, settings)
    except QuotaExceeded as exc:
        state.door.remember_quota(tenant, exc.message, exc.retry_after)  # refused again at the door meanwhile
        raise _refuse(state, tenant, "quota_exceeded", exc.message, exc.retry_after) from None


def _settings_and_admit(
    quotas: Any, tenant: str, settings: TenantSettings | None
) -> tuple[TenantSettings, bool]:
    # one trip off the event loop for both store reads: a refused request costs one thread hand-over
    settings = settings or quotas.settings(tenant)
    if not settings.has_rate_quotas:
        return settings, False
    return settings, quotas.admit(tenant, settings)


async def start(
    state: Any,
    principal: Principal,
    prefix_id: str | None,
    prompt: Prompt,
    params: SamplingParams,
    streamed: bool = True,
    fill_context: bool = False,
    special_tokens: bool = False,
    settings: TenantSettings | None = None,
) -> Generation:
    """Validate and queue a generation; `streamed` False: its outputs are read only once it is finished (a
    whole response), so they are handed over together; `fill_context`: params.max_new_tokens is a ceiling,
    lowered to the positions the prompt leaves; `special_tokens`: special tokens spelled in the prompt are
    those tokens (else plain text); `settings`: the tenant's, when already read (identify). Raises
    ServiceError (400, 404, 422, 429, 503)."""
    (gen,) = await start_choices(
        state, principal, prefix_id, prompt, [params], streamed, fill_context, special_tokens, settings
    )
    return gen


async def start_choices(
    state: Any,
    principal: Principal,
    prefix_id: str | None,
    prompt: Prompt,
    choices: list[SamplingParams],
    streamed: bool = True,
    fill_context: bool = False,
    special_tokens: bool = False,
    settings: TenantSettings | None = None,
) -> list[Generation]:
    """start() for the n choices of one request (a sampling setting each): each is counted and checked as a
    request, the prompt is tokenized once, and they are queued together or not at all, so that the engine
    admits them together (paged: the prompt runs once and its blocks are shared)."""
    if getattr(state, "draining", False):
        raise ServiceError(
            503, "draining", "this replica is shutting down; retry on another one", {"Retry-After": "1"}
        )
    try:  # refused by its length alone, before anything is read or counted
        if isinstance(prompt, str):
            state.prompts.check_length(None, prompt)
    except PromptTooLong as exc:
        raise ServiceError(422, "prompt_too_long", str(exc)) from exc
    state.num_starting = getattr(state, "num_starting", 0) + 1  # the drain waits for these too
    try:
        return await _start(
            state, principal, prefix_id, prompt, choices, streamed, fill_context, special_tokens, settings
        )
    finally:
        state.num_starting -= 1


async def _start(
    state: Any,
    principal: Principal,
    prefix_id: str | None,
    prompt: Prompt,
    choices: list[SamplingParams],
    streamed: bool,
    fill_context: bool,
    special_tokens: bool,
    known_settings: TenantSettings | None,
) -> list[Generation]:
    tenant = principal.identity
    num_counted = 0
    try:
        for _ in choices:
            settings, is_counted = await _admit(state, principal, tenant, known_settings)
            num_counted += is_counted
        gens = await _queue(
            state,
            principal,
            tenant,
            settings,
            prefix_id,
            prompt,
            choices,
            streamed,
            fill_context,
            special_tokens,
        )
    except BaseException:
        if num_counted:  # refused after all: the requests do not count against the quota
            _in_background(state.quotas.count, tenant, -num_counted, 0)
        raise
    if num_counted < len(choices) and not principal.is_admin:  # no per-minute quota: counted for usage
        _in_background(state.quotas.count, tenant, len(choices) - num_counted, 0)
    return gens


async def _queue(
    state: Any,
    principal: Principal,
    tenant: str,
    settings: TenantSettings,
    prefix_id: str | None,
    prompt: Prompt,
    choices: list[SamplingParams],
    streamed: bool,
    fill_context: bool,
    special_tokens: bool,
) -> list[Generation]:
    engine = state.engine
    num_beams = choices[0].num_beams
    if num_beams > engine.config.max_num_seqs:
        raise ServiceError(
            422,
            "invalid_sampling",
            f"num_beams {num_beams} is over this server's {engine.config.max_num_seqs} sequences per "
            "step (--max-num-seqs): a beam group runs as num_beams sequences",
        )
    check_room(state, tenant, settings, len(choices))  # a refusal costs no prefix load and no tokenizing
    prefix = await acquire_prefix(state, principal, prefix_id) if prefix_id is not None else None
    for _ in choices[1:]:  # a pin per choice: each releases its own when it finishes
        _pin(state, prefix)
    try:
        template = None if prefix is None else prefix.meta.prompt_template
        if isinstance(prompt, str):
            token_ids = await state.prompts.encode(template, prompt, special_tokens)
        else:  # a chat conversation: what its messages make of the prefix's template
            encoding = prompt(template)
            token_ids = await state.prompts.encode(
                encoding.template, encoding.text, encoding.special_tokens, encoding.add_special_tokens
            )
        num_prefix_tokens = 0 if prefix is None else prefix.num_virtual_tokens
        if fill_context:
            room = _room(engine, len(token_ids), num_prefix_tokens)
            choices = [
                replace(p, max_new_tokens=max(1, p.min_tokens, min(p.max_new_tokens, room))) for p in choices
            ]
        engine.check_fits(len(token_ids), num_prefix_tokens, choices[0].max_new_tokens, num_beams)
        # no await from this check to add(): concurrent requests of one tenant cannot both slip under it
        _check_concurrent(state, tenant, settings, len(choices))
        requests = engine.add_choices(
            token_ids,
            choices,
            prefix,
            prefix_id,
            tenant,
            weight=settings.weight,
            request_ids=[new_request_id() for _ in choices],
            trace_id=request_id_var.get(),
            each_token=streamed,
        )
        streams = [engine.stream_batches(request) for request in requests]
    except PromptTooLong as exc:
        _release(state, prefix, len(choices))
        raise ServiceError(422, "prompt_too_long", str(exc)) from exc
    except QuotaExceeded as exc:
        _release(state, prefix, len(choices))
        raise _refuse(state, tenant, "quota_exceeded", exc.message, exc.retry_after) from None
    except QueueFull as exc:
        _release(state, prefix, len(choices))
        raise _refuse(state, tenant, exc.code, str(exc), 1) from exc
    except EngineUnavailable as exc:  # /readyz says 503 too: a balancer takes this replica out
        _release(state, prefix, len(choices))
        raise ServiceError(503, "engine_unavailable", str(exc), {"Retry-After": "1"}) from exc
    except BaseException:
        _release(state, prefix, len(choices))
        raise
    state.metrics.tenant_requests.labels(tenant).inc(len(choices))
    counts_usage = not principal.is_admin
    return [
        Generation(request, prefix_id, stream, counts_usage=counts_usage)
        for request, stream in zip(requests, streams, strict=True)
    ]


def _room(engine: Any, num_prompt_tokens: int, num_prefix_tokens: int) -> int:
    """Positions left for new tokens: a decoder's prompt takes positions; an encoder's does not."""
    used = num_prefix_tokens if engine.is_encoder_decoder else num_prefix_tokens + num_prompt_tokens
    return engine.max_model_len - used


def check_room(state: Any, tenant: str, settings: TenantSettings, num: int = 1) -> None:
    """Refuse now (429) what engine.add would refuse for `num` requests: the tenant's max_concurrent, or a full
    queue. A refusal is remembered by the door, which refuses the tenant's next requests the same way before
    their body is read."""
    try:
        _check_concurrent(state, tenant, settings, num)
        state.engine.check_room(tenant, settings.weight, num)
    except QuotaExceeded as exc:
        state.door.remember_no_room(tenant)
        raise _refuse(state, tenant, "quota_exceeded", exc.message, exc.retry_after) from None
    except QueueFull as exc:
        state.door.remember_no_room(tenant)
        raise _refuse(state, tenant, exc.code, str(exc), 1) from exc


def _check_concurrent(state: Any, tenant: str, settings: TenantSettings, num: int = 1) -> None:
    """Refuse unless `num` more requests stay within the tenant's max_concurrent."""
    if settings.max_concurrent is not None:
        load = state.engine.tenant_load().get(tenant)
        num_active = 0 if load is None else load.num_running + load.num_waiting
        state.quotas.check_concurrent(tenant, settings, num_active + num - 1)


def _in_background(fn: Any, *args: Any) -> None:
    """Usage counting (a Redis round trip) off the request's path; nothing waits for it."""
    asyncio.get_running_loop().run_in_executor(None, fn, *args)


_TOKENIZE_LOCK = threading.Lock()


def tokenizer_lock() -> threading.Lock:
    """Held for any call into the backbone's shared tokenizer from a worker thread (see tokenize); requests'
    prompts are tokenized by state.prompts on tokenizer copies of their own."""
    return _TOKENIZE_LOCK


def tokenize(engine: Any, prompt: str) -> list[int]:
    """Off the event loop, one at a time: a HF fast tokenizer shared by threads can fail with "Already
    borrowed" when calls overlap."""
    with _TOKENIZE_LOCK:
        return engine.tokenize(prompt)


def _pin(state: Any, prefix: DevicePrefix | None) -> None:
    if prefix is not None:
        state.cache.pin(prefix)


def _release(state: Any, prefix: DevicePrefix | None, num: int = 1) -> None:
    if prefix is not None:
        for _ in range(num):
            state.cache.release(prefix)


async def outputs(state: Any, gen: Generation) -> AsyncIterator[RequestOutput]:
    """The request's outputs one by one (output_batches)."""
    async for batch in output_batches(state, gen):
        for output in batch:
            yield output


async def output_batches(state: Any, gen: Generation) -> AsyncIterator[list[RequestOutput]]:
    """The request's outputs, every one waiting at once in one list; counts tokens and latency (once per list,
    not per token); aborts on timeout or when the consumer goes away. An error output raises ServiceError
    after the outputs before it."""
    metrics = state.metrics
    tenant = gen.request.tenant or ADMIN_IDENTITY
    tenant_tokens = metrics.tenant_tokens.labels(tenant)  # the labelled child looked up once per request
    deadline = gen.started + state.settings.request_timeout
    stream = gen.stream
    timed_out = has_tokens = False

    def time_out() -> None:  # one timer per request, not a wait_for (a task and a timer) per token
        nonlocal timed_out
        timed_out = True
        state.engine.abort(gen.request.request_id)  # its stream ends with an abort output

    timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), time_out)
    try:
        async for batch in stream:
            if timed_out:
                raise ServiceError(
                    504,
                    "timeout",
                    f"generation took over {state.settings.request_timeout:g} s and was aborted",
                )
            good, error = _split_error(batch)
            num_new = _num_tokens(good)
            if num_new:
                if not has_tokens:  # the first batch with tokens holds the first token
                    has_tokens = True
                    produced = gen.request.first_token_time or time.monotonic()  # sampled (Engine)
                    metrics.time_to_first_token.observe(produced - gen.started)
                metrics.generated_tokens.inc(num_new)
                tenant_tokens.inc(num_new)
            if good:
                yield good
            if error is not None:
                message = error.error or ""
                if error.error_code == "numerical_error":  # the request's own numbers: it alone failed
                    raise ServiceError(422, "numerical_error", message)
                raise ServiceError(500, "engine_error", message)
            last = batch[-1]
            if last.is_finished:
                seconds = time.monotonic() - gen.started
                metrics.request_latency.observe(seconds)
                log.info(
                    "generation %s: prefix %s, %d prompt + %d new tokens, %s, %.3f s",
                    gen.request.request_id,
                    gen.prefix_id,
                    last.num_prompt_tokens,
                    last.num_output_tokens,
                    last.finish_reason,
                    seconds,
                )
                return
    finally:
        timer.cancel()
        await stream.aclose()
        request = gen.request
        if gen.counts_usage:
            _in_background(
                state.quotas.count, tenant, 0, len(request.prompt_token_ids) + len(request.output_token_ids)
            )


def _num_tokens(outputs: list[RequestOutput]) -> int:
    """Tokens the outputs carry: one each streamed, all of them on a whole response's last output (token_ids)."""
    num = 0
    for output in outputs:
        num += len(output.token_ids) if output.token_ids is not None else output.token_id is not None
    return num


def _split_error(batch: list[RequestOutput]) -> tuple[list[RequestOutput], RequestOutput | None]:
    """The outputs before the first error output, and that error (None without one)."""
    for i, output in enumerate(batch):
        if output.error:
            return batch[:i], output
    return batch, None


@dataclass
class Collected:
    """A whole generation: its token ids, text, the outputs that carried a token, and the last output."""

    token_ids: list[int]
    text: str
    token_outputs: list[RequestOutput]
    last: RequestOutput


async def run_to_end(state: Any, gen: Generation, http_request: HttpRequest) -> Collected:
    """Collect a whole generation; a client that disconnects aborts it (its slot frees at the next step)."""

    async def collect() -> Collected:
        token_ids: list[int] = []
        token_outputs: list[RequestOutput] = []  # per token only where the request asked for logprobs
        text = ""
        last: RequestOutput | None = None
        async for output in outputs(state, gen):
            if output.token_ids is not None:  # the whole response at once (Engine: no stop strings, logprobs)
                token_ids += output.token_ids
            elif output.token_id is not None:
                token_outputs.append(output)
                token_ids.append(output.token_id)
            text += output.text
            last = output
        assert last is not None
        return Collected(token_ids, text, token_outputs, last)

    task = asyncio.ensure_future(collect())
    disconnect = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if task.done():
        return task.result()
    task.cancel()
    state.engine.abort(gen.request.request_id)
    # No response is written to a closed connection, so no access line: this is the request's one line.
    log.info(
        "client disconnected while waiting for its answer: generation %s aborted", gen.request.request_id
    )
    raise ServiceError(499, "client_closed", "the client disconnected")


async def _disconnected(http_request: HttpRequest) -> None:
    """Returns when the client goes away. The body is read by now, so the server's next message is the
    disconnect: one waiting receive per request instead of a poll (a timer and a receive every 0.25 s each)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


def abort_unfinished(state: Any, gens: list[Generation]) -> None:
    """One of several generations failed (timeout, disconnect, refusal): the others must not hold slots."""
    for gen in gens:
        if not gen.request.is_finished:
            state.engine.abort(gen.request.request_id)


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams, or a 422 invalid_sampling saying which value is wrong."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise ServiceError(422, "invalid_sampling", str(exc)) from exc
