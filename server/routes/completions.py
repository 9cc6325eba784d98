"""OpenAI-compatible POST /v1/completions and GET /v1/models: `model` names a prefix id or the backbone."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, model_validator

from prefix_store.store import InvalidId, StoreUnavailable, split_id
from server import generation
from server.auth import CurrentPrincipal
from server.engine.request import RequestOutput, SamplingParams
from server.errors import ServiceError
from server.routes import openai_fields, openai_stream
from server.routes.decoding import (
    MAX_N,
    DecodingOptions,
    LegacyLogprobs,
    TokenTexts,
    per_completion,
    token_texts,
)
from server.routes.openai_fields import StreamOptions, VllmSampling
from server.sse import SseResponse

log = logging.getLogger("prefixserve.completions")

router = APIRouter(tags=["openai"])


class CompletionBody(DecodingOptions, VllmSampling):
    """OpenAI's legacy completions fields and vLLM's extensions: each honoured or refused by name; unknown
    fields are a 422."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(..., max_length=200, description="a prefix id <tenant>/<name>, or the backbone's name")
    prompt: str | list[str] = Field(..., description="a string or up to 32 strings")
    max_tokens: int | None = Field(16, ge=1, le=100_000, description="null = 16, OpenAI's default")
    temperature: float = Field(
        1.0, ge=0, le=100, allow_inf_nan=False, description="OpenAI's default is 1 (sampling); 0 = greedy"
    )
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: generation.StopString | generation.StopList | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="return the prompt before the completion")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only equal to n (no server-side ranking)")
    suffix: str | None = Field(None, description="not supported: must be absent or null")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be absent, null or {}")
    user: str | None = Field(None, max_length=256, description="logged with the request")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CompletionBody:
        if self.suffix is not None:
            raise ValueError("suffix (insertion) is not supported: send no suffix")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported: send no logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (no server-side ranking of extra completions)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (prompt logprobs): drop one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self


def _params(body: CompletionBody) -> SamplingParams:
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # null: OpenAI's default
    return openai_fields.sampling_params(body, max_tokens, body.logprobs)


@router.post("/v1/completions")
async def completions(body: CompletionBody, principal: CurrentPrincipal, http_request: Request):
    """OpenAI's legacy completions. Choices are ordered prompt by prompt, n per prompt."""
    state = http_request.app.state
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= 32:
        raise ServiceError(422, "invalid_request", "prompt must be a string or a list of 1 to 32 strings")
    if len(prompts) * body.n > 64:
        raise ServiceError(422, "invalid_request", "len(prompt) x n must be at most 64 completions")
    prefix_id = _prefix_id(body.model, state.engine.backbone.name)
    if body.user:
        log.info("completion for user %r", body.user)
    gens: list[generation.Generation] = []
    echoes: list[str] = []
    try:
        for prompt in prompts:
            each = per_completion(_params(body), body.n)
            gens += await generation.start_choices(state, principal, prefix_id, prompt, each, body.stream)
            echoes += [prompt if body.echo else ""] * body.n
    except ServiceError:
        generation.abort_unfinished(state, gens)
        raise
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    texts = token_texts(state) if body.logprobs is not None else None
    if body.stream:
        shape = _ChunkShape(head, echoes, texts)
        options = body.stream_options or StreamOptions()
        return SseResponse(
            openai_stream.chunks(state, gens, shape, head, options, body.n),
            lambda: generation.abort_unfinished(state, gens),
        )
    try:
        results = await asyncio.gather(*(generation.run_to_end(state, g, http_request) for g in gens))
    finally:  # one prompt failed (timeout, disconnect): the others must not hold their slots
        generation.abort_unfinished(state, gens)
    choices = []
    for i, (result, echo) in enumerate(zip(results, echoes, strict=True)):
        logprobs = None
        if texts is not None:
            legacy = LegacyLogprobs(texts)
            for output in result.token_outputs:
                legacy.add(output)
            logprobs = legacy.to_dict()
        choices.append(
            {
                "text": echo + result.text,
                "index": i,
                "logprobs": logprobs,
                "finish_reason": result.last.finish_reason,
            }
        )
    return {**head, "choices": choices, "usage": _usage(results, body.n)}


def _usage(results: list[generation.Collected], n: int) -> dict[str, int]:
    # each prompt counts once, as OpenAI counts it (its n completions share it)
    prompt_tokens = sum(r.last.num_prompt_tokens for r in results[::n])
    completion_tokens = sum(len(r.token_ids) for r in results)
    return openai_fields.usage(prompt_tokens, completion_tokens)


class _ChunkShape:
    """A completions chunk: the choice's text (the prompt first, with echo) and legacy logprobs."""

    def __init__(self, head: dict[str, Any], echoes: list[str], texts: TokenTexts | None):
        self.head, self.echoes, self.texts = head, echoes, texts
        self._legacy: tuple[int, LegacyLogprobs] | None = None  # the choice whose logprobs are being built

    def opening(self, index: int) -> dict[str, Any] | None:
        return self.chunk(index, self.echoes[index], None, None) if self.echoes[index] else None

    def first(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
        return {**self.head, "choices": [_choice(text, index, logprobs, reason)]}

    def logprobs(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        if self.texts is None:
            return None
        if self._legacy is None or self._legacy[0] != index:
            self._legacy = index, LegacyLogprobs(self.texts)
        return self._legacy[1].add(output)


def _choice(text: str, index: int, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _prefix_id(model: str, backbone_name: str) -> str | None:
    """None for the backbone; a prefix id; anything else is a model that does not exist (404, as OpenAI)."""
    if model == backbone_name:
        return None
    try:
        split_id(model)
    except InvalidId:
        raise ServiceError(
            404,
            "model_not_found",
            f"no model {model!r}: use the backbone's name ({backbone_name!r}) or a prefix id <tenant>/<name> "
            "(GET /v1/models lists them)",
        ) from None
    return model


@router.get("/v1/models")
async def models(request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    """The backbone and the prefixes this key can generate with (first 1000)."""
    state = request.app.state
    engine = state.engine
    data = [_backbone_entry(engine)]
    try:
        page, _ = await asyncio.to_thread(
            state.store.list, principal.tenant, 1000, None, not principal.is_admin
        )
    except StoreUnavailable as exc:
        raise ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc})") from exc
    data += [_prefix_entry(engine, m) for m in page]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    """One model (OpenAI's models.retrieve): the backbone, or a prefix this key can generate with."""
    engine = request.app.state.engine
    prefix_id = _prefix_id(model, engine.backbone.name)
    if prefix_id is None:
        return _backbone_entry(engine)
    store = request.app.state.store
    tenant, _ = split_id(prefix_id)
    try:
        if principal.is_admin or tenant == principal.tenant:
            meta = await asyncio.to_thread(store.get_meta, prefix_id)
        else:
            meta = await asyncio.to_thread(generation.public_meta, store, prefix_id)
    except StoreUnavailable as exc:
        raise ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc})") from exc
    if meta is None:
        raise ServiceError(
            404, "model_not_found", f"no model {model!r} that this key can use (GET /v1/models lists them)"
        )
    return _prefix_entry(engine, meta)


def _backbone_entry(engine: Any) -> dict[str, Any]:
    name = engine.backbone.name
    return _model_entry(name, 0, "prefixserve", name, None, engine.max_model_len)


def _prefix_entry(engine: Any, meta: Any) -> dict[str, Any]:
    backbone = engine.backbone.name
    room = _room(engine, meta.num_virtual_tokens)
    return _model_entry(meta.id, int(meta.created_at), meta.tenant, meta.id, backbone, room)


def _room(engine: Any, num_virtual_tokens: int) -> int:
    """Positions left for prompt and output with a prefix (a decoder's prefix takes positions of its own)."""
    return engine.max_model_len - (0 if engine.is_encoder_decoder else num_virtual_tokens)


def _model_entry(
    model_id: str, created: int, owned_by: str, root: str, parent: str | None, max_model_len: int
) -> dict[str, Any]:
    """A /v1/models entry with vLLM's fields: `parent` is the backbone for a prefix (as for a LoRA adapter)."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
    }
