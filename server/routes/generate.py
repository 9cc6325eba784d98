"""POST /v1/generate: one generation, whole or streamed (SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from server import generation
from server.auth import CurrentPrincipal
from server.errors import ServiceError

router = APIRouter(tags=["generation"])


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    prefix: str | None
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateBody, principal: CurrentPrincipal, http_request: Request):
    """Generate from a prefix (or the bare backbone). Greedy output equals PEFT's generate for that adapter."""
    state = http_request.app.state
    gen = await generation.start(
        state,
        principal,
        body.prefix,
        body.prompt,
        generation.sampling_params(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(body.stop),
            ignore_eos=body.ignore_eos,
        ),
    )
    if body.stream:
        return StreamingResponse(_events(state, gen), media_type="text/event-stream")
    token_ids, text, last = await generation.run_to_end(state, gen, http_request)
    return GenerateResponse(
        id=gen.request.request_id,
        prefix=body.prefix,
        text=text,
        token_ids=token_ids,
        finish_reason=last.finish_reason or "stop",
        usage=Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=len(token_ids)),
    )


async def _events(state, gen: generation.Generation) -> AsyncIterator[str]:
    completion_tokens = 0
    try:
        async for output in generation.outputs(state, gen):
            if output.token_id is not None:
                completion_tokens += 1
                yield generation.sse({"token_id": output.token_id, "text": output.text})
            if output.is_finished:
                usage = {"prompt_tokens": output.num_prompt_tokens, "completion_tokens": completion_tokens}
                # text held back until the end (e.g. before an EOS) rides on the last event
                rest = output.text if output.token_id is None else ""
                last = {"id": gen.request.request_id, "prefix": gen.prefix_id, "text": rest}
                yield generation.sse({**last, "finish_reason": output.finish_reason, "usage": usage})
    except ServiceError as exc:
        yield generation.sse({"error": {"code": exc.code, "message": exc.message}})
    yield generation.sse("[DONE]")
