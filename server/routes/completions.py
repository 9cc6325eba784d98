"""OpenAI-compatible POST /v1/completions and GET /v1/models: `model` names a prefix id or the backbone."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from prefix_store.store import InvalidId, StoreUnavailable, split_id
from server import generation
from server.auth import CurrentPrincipal
from server.engine.request import SamplingParams
from server.errors import ServiceError

router = APIRouter(tags=["openai"])


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields we do not use

    model: str = Field(..., max_length=200, description="a prefix id <tenant>/<name>, or the backbone's name")
    prompt: str | list[str] = Field(..., description="a string or up to 32 strings")
    max_tokens: int = Field(16, ge=1, le=100_000)
    temperature: float = Field(
        1.0, ge=0, le=100, allow_inf_nan=False, description="OpenAI's default is 1 (sampling); 0 = greedy"
    )
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: generation.StopString | generation.StopList | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")


def _params(body: CompletionBody) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return generation.sampling_params(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(stop),
    )


@router.post("/v1/completions")
async def completions(body: CompletionBody, principal: CurrentPrincipal, http_request: Request):
    state = http_request.app.state
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= 32:
        raise ServiceError(422, "invalid_request", "prompt must be a string or a list of 1 to 32 strings")
    prefix_id = _prefix_id(body.model, state.engine.backbone.name)
    params = _params(body)
    gens = []
    try:
        for prompt in prompts:
            gens.append(await generation.start(state, principal, prefix_id, prompt, params))
    except ServiceError:
        for gen in gens:
            state.engine.abort(gen.request.request_id)
        raise
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    if body.stream:
        return StreamingResponse(_chunks(state, gens, head), media_type="text/event-stream")
    try:
        results = await asyncio.gather(*(generation.run_to_end(state, g, http_request) for g in gens))
    finally:  # one prompt failed (timeout, disconnect): the others must not hold their slots
        _abort_unfinished(state, gens)
    choices = [
        {"text": text, "index": i, "logprobs": None, "finish_reason": last.finish_reason}
        for i, (_, text, last) in enumerate(results)
    ]
    prompt_tokens = sum(last.num_prompt_tokens for _, _, last in results)
    completion_tokens = sum(len(ids) for ids, _, _ in results)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {**head, "choices": choices, "usage": usage}


async def _chunks(state: Any, gens: list[generation.Generation], head: dict) -> AsyncIterator[str]:
    try:
        for index, gen in enumerate(gens):
            async for output in generation.outputs(state, gen):
                if output.text or output.is_finished:
                    choice = {
                        "text": output.text,
                        "index": index,
                        "logprobs": None,
                        "finish_reason": output.finish_reason if output.is_finished else None,
                    }
                    yield generation.sse({**head, "choices": [choice]})
    except ServiceError as exc:
        yield generation.sse({"error": {"code": exc.code, "message": exc.message}})
    finally:
        _abort_unfinished(state, gens)
    yield generation.sse("[DONE]")


def _abort_unfinished(state: Any, gens: list[generation.Generation]) -> None:
    for gen in gens:
        if not gen.request.is_finished:
            state.engine.abort(gen.request.request_id)


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
    data = [{"id": state.engine.backbone.name, "object": "model", "created": 0, "owned_by": "prefixserve"}]
    try:
        page, _ = await asyncio.to_thread(
            state.store.list, principal.tenant, 1000, None, not principal.is_admin
        )
    except StoreUnavailable as exc:
        raise ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc})") from exc
    data += [
        {
            "id": m.id,
            "object": "model",
            "created": int(m.created_at),
            "owned_by": m.tenant,
            "parent": data[0]["id"],
        }
        for m in page
    ]
    return {"object": "list", "data": data}
