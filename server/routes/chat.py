"""OpenAI-compatible POST /v1/chat/completions: `model` names a prefix id or the backbone, as on /v1/completions.

The conversation becomes a prompt by the backbone tokenizer's chat template where it has one; otherwise by the
prefix's prompt template, whose `{source}` takes the one user message (single-turn: a system message or earlier
turns cannot be honoured and are refused by name). With neither template the request is refused, saying why.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server import generation
from server.auth import CurrentPrincipal
from server.engine.request import RequestOutput
from server.errors import ServiceError
from server.routes import openai_fields, openai_stream
from server.routes.completions import _prefix_id
from server.routes.decoding import MAX_LOGPROBS, DecodingOptions, TokenTexts, per_completion, token_texts
from server.routes.openai_fields import StreamOptions, VllmSampling
from server.sse import SseResponse

log = logging.getLogger("prefixserve.chat")

router = APIRouter(tags=["openai"])

MAX_MESSAGES = 256


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="a string, or a list of parts of which only text parts are supported"
    )
    name: str | None = Field(None, max_length=256)
    tool_calls: list[Any] | None = Field(None, description="not supported: must be absent or null")
    tool_call_id: str | None = Field(None, description="not supported: must be absent or null")


class ChatBody(DecodingOptions, VllmSampling):
    """OpenAI's chat completions fields and vLLM's extensions: each honoured or refused by name; unknown fields
    are a 422."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., max_length=200, description="a prefix id <tenant>/<name>, or the backbone's name")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, strict=True, ge=1, le=100_000)
    max_tokens: int | None = Field(
        None, strict=True, ge=1, le=100_000, description="OpenAI's older name; max_completion_tokens wins"
    )
    temperature: float | None = Field(
        1.0, strict=True, ge=0, le=100, allow_inf_nan=False, description="0 = greedy"
    )
    top_p: float | None = Field(1.0, strict=True, gt=0, le=1, allow_inf_nan=False)
    stop: generation.StopString | generation.StopList | None = None
    seed: int | None = Field(None, strict=True, ge=0, le=2**63 - 1)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(False, strict=True, description="each token's log-probability")  # type: ignore[assignment]
    top_logprobs: int | None = Field(None, strict=True, ge=0, le=MAX_LOGPROBS)
    user: str | None = Field(None, strict=True, max_length=256, description="logged with the request")
    add_generation_prompt: bool = Field(True, strict=True, description="vLLM's, for a chat template")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be absent, null or {}")
    tools: list[Any] | None = Field(None, description="not supported: must be absent or null")
    tool_choice: Any = Field(None, description='not supported: absent, null or "none"')
    parallel_tool_calls: bool | None = Field(None, strict=True, description="not supported: absent or null")
    functions: list[Any] | None = Field(None, description="not supported: must be absent or null")
    function_call: Any = Field(None, description='not supported: absent, null or "none"')
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')

    @model_validator(mode="after")
    def _check_pairs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    def unsupported(self) -> list[str]:
        """The fields sent that plain text generation cannot honour."""
        return [
            name
            for name, is_set in (
                ("tools", bool(self.tools)),
                ("tool_choice", self.tool_choice not in (None, "none")),
                ("parallel_tool_calls", self.parallel_tool_calls is not None),
                ("functions", bool(self.functions)),
                ("function_call", self.function_call not in (None, "none")),
                ("logit_bias", bool(self.logit_bias)),
                ("response_format", self.response_format not in (None, {"type": "text"})),
            )
            if is_set
        ]

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, principal: CurrentPrincipal, http_request: Request):
    """OpenAI's chat completions: n choices of one conversation."""
    state = http_request.app.state
    engine = state.engine
    if refused := body.unsupported():
        raise ServiceError(
            400,
            "unsupported_field",
            f"{', '.join(refused)}: not supported (plain text generation only); send none",
        )
    prefix_id = _prefix_id(body.model, engine.backbone.name)
    prompt = _prompt(body, engine.backbone.tokenizer, body.model, prefix_id is not None)
    limit = body.max_completion_tokens or body.max_tokens
    params = openai_fields.sampling_params(body, limit or engine.max_model_len, body.num_logprobs())
    if body.user:
        log.info("chat completion for user %r", body.user)
    gens: list[generation.Generation] = []
    try:
        choices = per_completion(params, body.n)
        gens = await generation.start_choices(
            state, principal, prefix_id, prompt, choices, bool(body.stream), fill_context=limit is None
        )
    except ServiceError:
        generation.abort_unfinished(state, gens)
        raise
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
    }
    texts = token_texts(state) if body.logprobs else None
    if body.stream:
        options = body.stream_options or StreamOptions()
        head["object"] = "chat.completion.chunk"
        return SseResponse(
            openai_stream.chunks(state, gens, _ChunkShape(head, texts), head, options, len(gens)),
            lambda: generation.abort_unfinished(state, gens),
        )
    try:
        results = await asyncio.gather(*(generation.run_to_end(state, g, http_request) for g in gens))
    finally:  # one choice failed (timeout, disconnect): the others must not hold their slots
        generation.abort_unfinished(state, gens)
    prompt_tokens = results[0].last.num_prompt_tokens  # the n choices share the prompt
    usage = openai_fields.usage(prompt_tokens, sum(len(r.token_ids) for r in results))
    return {**head, "choices": [_choice(i, r, texts) for i, r in enumerate(results)], "usage": usage}


def _choice(index: int, result: generation.Collected, texts: TokenTexts | None) -> dict[str, Any]:
    logprobs = None if texts is None else {"content": [_logprob(o, texts) for o in result.token_outputs]}
    return {
        "index": index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": logprobs,
        "finish_reason": result.last.finish_reason,
    }


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "unsupported_message", message)


def _text(message: ChatMessage, index: int) -> str:
    """A message's content as text: a string, or its text parts joined."""
    if message.tool_calls or message.tool_call_id is not None:
        field = "tool_calls" if message.tool_calls else "tool_call_id"
        raise _bad(f"messages[{index}].{field}: tool calls are not supported; send plain text messages")
    if isinstance(message.content, str) or message.content is None:
        return message.content or ""
    pieces = []
    for j, part in enumerate(message.content):
        if (
            part.get("type") != "text"
            or not isinstance(part.get("text"), str)
            or set(part) != {"type", "text"}
        ):
            raise _bad(
                f'messages[{index}].content[{j}]: only text parts ({{"type": "text", "text": ...}}) are '
                "supported"
            )
        pieces.append(part["text"])
    return "".join(pieces)


def _prompt(body: ChatBody, tokenizer: Any, model: str, is_prefix: bool) -> generation.Prompt:
    """The conversation as the prompt: the chat template's rendering, or a function of the prefix's prompt
    template filled with the one user message."""
    texts = [_text(m, i) for i, m in enumerate(body.messages)]
    chat_template = getattr(tokenizer, "chat_template", None)
    if chat_template:
        conversation = [
            {"role": m.role, "content": t, **({"name": m.name} if m.name else {})}
            for m, t in zip(body.messages, texts, strict=True)
        ]
        try:
            rendered = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as exc:  # the template's own checks (e.g. roles must alternate)
            raise _bad(f"messages: the backbone's chat template refused this conversation ({exc})") from None
        # the chat template makes the whole prompt, its own special tokens read as such and none added (as HF's
        # apply_chat_template(tokenize=True) and vLLM tokenize it: a template that spells BOS gets one BOS)
        return lambda template: generation.Encoding(None, rendered, True, add_special_tokens=False)
    _single_turn(body)
    source = texts[-1]

    def fill(template: str | None) -> generation.Encoding:
        if template is None:
            what = (
                "the prefix has no prompt_template"
                if is_prefix
                else "a backbone alone has no prompt template"
            )
            raise ServiceError(
                400,
                "no_chat_template",
                f"model {model!r} cannot turn messages into a prompt: the backbone has no chat template and "
                f"{what}; use POST /v1/completions with the whole prompt, or a prefix stored with a "
                "prompt_template holding {source}",
            )
        return generation.Encoding(template, source, False)  # the user's text as in /v1/completions

    return fill


def _single_turn(body: ChatBody) -> None:
    """A prompt template takes one source: one user message, nothing else."""
    for i, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            raise _bad(
                f"messages[{i}]: a {message.role} message cannot be honoured: the backbone has no chat template "
                "and the prefix's prompt template takes one user message; send only that message"
            )
    if len(body.messages) > 1:
        raise _bad(
            f"messages: {len(body.messages) - 1} earlier turn(s) cannot be honoured: the backbone has no chat "
            "template and the prefix's prompt template takes one user message (single-turn); send only the last"
        )
    message = body.messages[0]
    if message.role != "user":
        raise _bad(f"messages[0].role: {message.role!r} cannot be honoured; send one user message")
    if message.name is not None:
        raise _bad("messages[0].name: cannot be honoured by a prompt template; send no name")


def _logprob(output: Any, texts: TokenTexts) -> dict[str, Any]:
    """One token's entry in the chat shape's logprobs.content."""
    text = texts(output.token_id)
    return {
        "token": text,
        "logprob": output.logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": texts(t), "logprob": lp, "bytes": list(texts(t).encode())}
            for t, lp in output.top_logprobs or []
        ],
    }


class _ChunkShape:
    """A chat chunk: the choice's delta (the role first), logprobs as logprobs.content."""

    def __init__(self, head: dict[str, Any], texts: TokenTexts | None):
        self.head, self.texts = head, texts

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def first(self, index: int) -> dict[str, Any] | None:
        return _event(self.head, index, {"role": "assistant", "content": ""}, None, None)

    def chunk(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
        return _event(self.head, index, {"content": text} if text else {}, logprobs, reason)

    def logprobs(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        return None if self.texts is None else {"content": [_logprob(output, self.texts)]}


def _event(head: dict, index: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
    return {
        **head,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
    }
