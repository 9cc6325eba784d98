"""The stream both OpenAI endpoints send: a chunk per token, the usage, an error, `[DONE]`. What differs between
/v1/completions and /v1/chat/completions (the choice's `text` or `delta`, completions' echo, chat's role chunk,
the logprobs shape) is a ChunkShape."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from server import generation
from server.engine.request import RequestOutput
from server.errors import ServiceError
from server.routes.openai_fields import StreamOptions, usage
from server.sse import SseChunks, SseTemplate, sse


class ChunkShape(Protocol):
    def opening(self, index: int) -> dict[str, Any] | None:
        """A chunk sent at once, before choice `index` waits for its first output (completions' echo)."""

    def first(self, index: int) -> dict[str, Any] | None:
        """A chunk before choice `index`'s first token (chat's role)."""

    def chunk(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
        """Choice `index`'s chunk carrying `text`."""

    def logprobs(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        """The logprobs of the token `output` carries; None when the request did not ask for them."""


def token_template(data: dict, continuous: bool) -> SseTemplate:
    """A token's chunk: `data` holds SseTemplate.field("text") where its text goes; with continuous_usage_stats
    the usage so far follows (rendered with the text, prompt, completion and total tokens)."""
    if not continuous:
        return SseTemplate(data, "text")
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    fields = {name: SseTemplate.field(name) for name in counts}
    return SseTemplate({**data, "usage": fields}, "text", *counts)


async def chunks(
    state: Any,
    gens: list[generation.Generation],
    shape: ChunkShape,
    head: dict[str, Any],
    options: StreamOptions,
    n: int,
) -> AsyncGenerator[bytes, None]:
    """The choices one after another (every `n` choices share a prompt, counted once); the chunks of the outputs
    waiting at once leave in one write (SseChunks)."""
    prompt_tokens = completion_tokens = 0  # prompts counted once their first output came
    continuous = bool(options.include_usage and options.continuous_usage_stats)
    gathered = SseChunks(state.settings.stream_interval)
    try:
        for index, gen in enumerate(gens):
            text_chunk = token_template(shape.chunk(index, SseTemplate.field("text"), None, None), continuous)
            if (opening := shape.opening(index)) is not None:
                yield sse(opening)
            is_first = True
            async for batch in generation.output_batches(state, gen):
                for output in batch:
                    completion_tokens += output.token_id is not None
                    if is_first:
                        if index % n == 0:
                            prompt_tokens += output.num_prompt_tokens
                        if (first := shape.first(index)) is not None:
                            gathered.add(first)
                        is_first = False
                    logprobs = shape.logprobs(index, output) if output.token_id is not None else None
                    if output.is_finished or logprobs is not None:
                        reason = output.finish_reason if output.is_finished else None
                        event = shape.chunk(index, output.text, logprobs, reason)
                        if continuous:
                            event["usage"] = usage(prompt_tokens, completion_tokens)
                        gathered.add(event)
                    elif output.text and continuous:
                        total = prompt_tokens + completion_tokens
                        gathered.add_rendered(
                            text_chunk.render(output.text, prompt_tokens, completion_tokens, total)
                        )
                    elif output.text:
                        gathered.add_rendered(text_chunk.render(output.text))
                if (chunk := gathered.ready(batch)) is not None:
                    yield chunk
        if options.include_usage:
            gathered.add({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except ServiceError as exc:
        gathered.add({"error": {"code": exc.code, "message": exc.message}})
    finally:
        generation.abort_unfinished(state, gens)
    gathered.add("[DONE]")
    yield gathered.take()
