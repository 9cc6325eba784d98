"""POST /v1/generate: one generation (or n), whole or streamed (SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server import generation
from server.errors import FastJSONResponse, ServiceError
from server.routes.decoding import DecodingOptions, generate_logprob, per_completion, token_texts
from server.sse import SseChunks, SseResponse, SseTemplate

router = APIRouter(tags=["generation"])

# the key checked and the tenant's settings read in one trip off the event loop
CurrentCaller = Annotated[generation.Caller, Depends(generation.identify)]


class GenerateBody(DecodingOptions):
    model_config = ConfigDict(extra="forbid", strict=True)

    prefix: str | None = Field(None, description="prefix id <tenant>/<name>; null for the bare backbone")
    prompt: str = Field(..., max_length=1_000_000)
    max_new_tokens: int = Field(64, ge=1, le=100_000)
    temperature: float = Field(
        0.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="0 = greedy; tiny values act as 1e-30 (greedy up to ties)",
    )
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: generation.StopList = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    special_tokens: bool = Field(
        False,
        description="text in the prompt that spells a special token (e.g. <|endoftext|>) is that token; by "
        "default it is plain text (the prefix's template keeps its own special tokens either way)",
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Choice(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None


class GenerateResponse(BaseModel):
    """The first completion's fields at the top; with n > 1 every completion is in `choices`."""

    id: str
    prefix: str | None
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[dict[str, Any]] | None = None
    choices: list[Choice] | None = None


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateBody, caller: CurrentCaller, http_request: Request):
    """Generate from a prefix (or the bare backbone). Greedy output equals PEFT's generate for that adapter."""
    state = http_request.app.state
    principal = caller.principal
    params = generation.sampling_params(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
        **body.penalties(),
    )
    gens: list[generation.Generation] = []
    try:
        gens = await generation.start_choices(
            state,
            principal,
            body.prefix,
            body.prompt,
            per_completion(params, body.n),
            body.stream,
            special_tokens=body.special_tokens,
            settings=caller.settings,
        )
    except ServiceError:
        for gen in gens:
            state.engine.abort(gen.request.request_id)
        raise
    if body.stream:
        return SseResponse(_events(state, gens, body.n > 1), lambda: generation.abort_unfinished(state, gens))
    try:
        results = await asyncio.gather(*(generation.run_to_end(state, g, http_request) for g in gens))
    finally:
        generation.abort_unfinished(state, gens)
    texts = token_texts(state) if body.logprobs is not None else None
    choices = [
        Choice(
            index=i,
            text=r.text,
            token_ids=r.token_ids,
            finish_reason=r.last.finish_reason or "stop",
            logprobs=None if texts is None else [generate_logprob(o, texts) for o in r.token_outputs],
        )
        for i, r in enumerate(results)
    ]
    first = choices[0]
    response = GenerateResponse(
        id=gens[0].request.request_id,
        prefix=body.prefix,
        text=first.text,
        token_ids=first.token_ids,
        finish_reason=first.finish_reason,
        usage=Usage(
            prompt_tokens=results[0].last.num_prompt_tokens,
            completion_tokens=sum(len(c.token_ids) for c in choices),
        ),
        logprobs=first.logprobs,
        choices=choices if body.n > 1 else None,
    )
    # `prefix` stays (null for the bare backbone); logprobs and choices appear only when asked for
    absent = {name for name in ("logprobs", "choices") if getattr(response, name) is None}
    return FastJSONResponse(response.model_dump(exclude=absent, exclude_none=False))


async def _events(state, gens: list[generation.Generation], with_index: bool) -> AsyncGenerator[bytes, None]:
    """One event per token (with `index` when n > 1), completions one after another; a last event per
    completion with finish_reason and usage. The events of the outputs waiting at once leave in one write."""
    asks_logprobs = gens[0].request.params.logprobs is not None
    texts = token_texts(state) if asks_logprobs else None
    chunks = SseChunks(state.settings.stream_interval)
    mark = SseTemplate.field
    try:
        for index, gen in enumerate(gens):
            completion_tokens = 0
            where = {"index": index} if with_index else {}
            token_event = SseTemplate({**where, "token_id": mark("id"), "text": mark("text")}, "id", "text")
            async for batch in generation.output_batches(state, gen):
                for output in batch:
                    if output.token_id is not None:
                        completion_tokens += 1
                        if texts is not None:
                            event = {**where, "token_id": output.token_id, "text": output.text}
                            chunks.add({**event, "logprobs": generate_logprob(output, texts)})
                        else:
                            chunks.add_rendered(token_event.render(output.token_id, output.text))
                    if output.is_finished:
                        usage = {
                            "prompt_tokens": output.num_prompt_tokens,
                            "completion_tokens": completion_tokens,
                        }
                        # text held back until the end (e.g. before an EOS) rides on the last event
                        rest = output.text if output.token_id is None else ""
                        last = {**where, "id": gen.request.request_id, "prefix": gen.prefix_id, "text": rest}
                        chunks.add({**last, "finish_reason": output.finish_reason, "usage": usage})
                if (chunk := chunks.ready(batch)) is not None:
                    yield chunk
    except ServiceError as exc:
        chunks.add({"error": {"code": exc.code, "message": exc.message}})
    finally:
        generation.abort_unfinished(state, gens)
    chunks.add("[DONE]")
    yield chunks.take()
