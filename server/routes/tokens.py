"""vLLM's POST /tokenize and POST /detokenize: the backbone's tokenizer, for clients that count tokens (evaluation
harnesses). The text is tokenized as sent: a prefix's prompt template is not applied."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from prefix_store.store import StoreUnavailable
from server import generation
from server.auth import CurrentPrincipal, Principal
from server.engine.engine import PromptTooLong
from server.errors import ServiceError
from server.routes.completions import _prefix_id

router = APIRouter(tags=["openai"])

MAX_TOKENS = 1_000_000


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200, description="the backbone or a prefix id (one tokenizer)")
    prompt: str = Field(..., strict=True)
    add_special_tokens: bool = Field(True, strict=True, description="as the server tokenizes prompts")
    return_token_strs: bool | None = Field(False, strict=True, description="each token's text too")


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200, description="the backbone or a prefix id (one tokenizer)")
    tokens: list[int] = Field(..., strict=True, max_length=MAX_TOKENS)


async def _check_model(state: Any, principal: Principal, model: str | None) -> None:
    """A model this key can use, or a 404 as on the generation endpoints."""
    if model is None:
        return
    prefix_id = _prefix_id(model, state.engine.backbone.name)
    if prefix_id is None:
        return
    try:
        meta = await asyncio.to_thread(state.store.get_meta, prefix_id)
    except StoreUnavailable as exc:
        raise ServiceError(503, "store_unavailable", f"the prefix store is unreachable ({exc})") from exc
    if meta is None or not principal.can_generate(meta):
        raise generation.not_found(prefix_id)


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, principal: CurrentPrincipal, request: Request) -> dict[str, Any]:
    """The prompt's token ids (with the special tokens the server adds to a prompt, unless told not to)."""
    state = request.app.state
    try:  # as a generation's prompt: a text no prompt could hold is refused by its length, before any work
        state.prompts.check_length(None, body.prompt)
    except PromptTooLong as exc:
        raise ServiceError(422, "prompt_too_long", str(exc)) from exc
    await _check_model(state, principal, body.model)
    engine = state.engine
    if body.add_special_tokens:
        ids = await asyncio.to_thread(generation.tokenize, engine, body.prompt)
    else:
        ids = await asyncio.to_thread(_plain_ids, engine, body.prompt)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    if body.return_token_strs:
        tokenizer = engine.backbone.tokenizer
        with generation.tokenizer_lock():
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


def _plain_ids(engine: Any, prompt: str) -> list[int]:
    with generation.tokenizer_lock():
        return list(engine.backbone.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, principal: CurrentPrincipal, request: Request) -> dict[str, str]:
    """The text of token ids (special tokens included, so that /tokenize's ids come back as they went)."""
    state = request.app.state
    await _check_model(state, principal, body.model)
    tokenizer = state.engine.backbone.tokenizer
    if (
        len(body.tokens) > state.engine.max_model_len
    ):  # no sequence here is longer: the tokenizer's time is bounded
        raise ServiceError(
            422,
            "invalid_request",
            f"tokens: {len(body.tokens)} ids are more than this server's max_model_len "
            f"({state.engine.max_model_len}); detokenize them in parts",
        )
    vocab = len(tokenizer)
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise ServiceError(
                422, "invalid_request", f"tokens[{i}]: {token} is not a token id (0 to {vocab - 1})"
            )

    def decode() -> str:
        with generation.tokenizer_lock():
            return tokenizer.decode(body.tokens)

    return {"prompt": await asyncio.to_thread(decode)}
