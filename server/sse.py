"""Server-sent events: a stream's events rendered to bytes, gathered into writes, and the response that sends them.

A streamed request costs the host per event, so the per-token event is a byte template with only its varying
values encoded (SseTemplate); the events of every output waiting for a request leave in one write (SseChunks);
and the response is plain ASGI (SseResponse): one send per write, no task group per response, its body
messages past the layers that watch only a response's start.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from starlette.responses import Response

from server.engine.request import RequestOutput
from server.front import BODY_SEND


def sse(data: Any) -> bytes:
    """One event: a string as it is (`[DONE]`), anything else as JSON (json.dumps' spacing, ASCII only)."""
    return b"data: %s\n\n" % (data if isinstance(data, str) else json.dumps(data)).encode()


def json_str(text: str) -> bytes:
    """`json.dumps(text).encode()`, by orjson where that gives the same bytes: ASCII text without DEL (json.dumps
    writes DEL and non-ASCII characters as \\u escapes, orjson as they are)."""
    if text.isascii() and "\x7f" not in text:
        return orjson.dumps(text)
    return json.dumps(text).encode()


class SseTemplate:
    """The per-token event of a stream, its JSON encoded once: `SseTemplate(data, *fields)` where `data` holds
    the mark `SseTemplate.field(name)` for each varying field; `render(*values)` gives exactly
    `sse(data with the values)`, encoding only the values (a str as JSON, an int as its digits)."""

    # marks no request can spell (a model name holding one would break the split)
    _SALT = secrets.token_hex(8)

    @classmethod
    def field(cls, name: str) -> str:
        return f"\x00{name}:{cls._SALT}\x00"

    def __init__(self, data: dict, *fields: str):
        parts = [sse(data)]
        for name in fields:
            mark = json.dumps(self.field(name)).encode()
            before, found, after = parts.pop().partition(mark)
            if not found or mark in after:
                raise ValueError(f"{name!r} must appear once in the template")
            parts += [before, after]
        self._head = parts[0]
        self._tails = parts[1:]

    def render(self, *values: str | int) -> bytes:
        out = [self._head]
        for value, tail in zip(values, self._tails, strict=True):
            out += [json_str(value) if isinstance(value, str) else b"%d" % value, tail]
        return b"".join(out)


class SseChunks:
    """The events of one response, gathered into writes: each batch of outputs (every output waiting for the
    request, Engine.stream_batches) leaves in one write, so a stream whose reader fell behind the engine catches
    up in one write instead of one per token; while the reader keeps up, every token's event leaves alone and at
    once. With `--stream-interval N` the first write leaves at once (the time to first token is not delayed),
    then every N tokens' events together (and whatever is left when a generation ends): fewer, larger writes
    leave the engine more of the host, at the price of a token's event leaving up to N-1 steps after it was
    made."""

    def __init__(self, interval: int = 1):
        self.interval = interval
        self._events: list[bytes] = []
        self._tokens = 0  # tokens among the gathered events
        self._has_sent = False

    def add(self, data: Any) -> None:
        self._events.append(sse(data))

    def add_rendered(self, event: bytes) -> None:
        """An event already in SSE form (SseTemplate.render)."""
        self._events.append(event)

    def ready(self, batch: list[RequestOutput]) -> bytes | None:
        """The events gathered so far, once `batch` (a generation's outputs) is rendered; None to keep gathering:
        fewer than --stream-interval tokens since the last write (the response's first write excepted) and the
        generation is not finished."""
        if self.interval == 1:  # the default: every batch's events at once
            return self.take() if self._events else None
        self._tokens += sum(output.token_id is not None for output in batch)
        if not self._events:
            return None
        if self._has_sent and self._tokens < self.interval and not batch[-1].is_finished:
            return None
        return self.take()

    def take(self) -> bytes:
        chunk = b"".join(self._events)
        self._events.clear()
        self._tokens, self._has_sent = 0, True
        return chunk


class SseResponse(Response):
    """A text/event-stream response sending `chunks` (bytes), one ASGI send each, as plain ASGI. Starlette's
    StreamingResponse runs each response in a task group with a second task listening for the disconnect; here
    one waiting receive per response calls `on_disconnect` when the client leaves (the caller aborts its
    generations there: their streams end, so `chunks` ends too, its last events sent to nobody)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None], on_disconnect: Callable[[], None]):
        self.chunks = chunks
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body_send = scope.get(BODY_SEND, send)  # past the layers that watch only the start (FrontMiddleware)
        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(self._on_gone)
        try:
            async for chunk in self.chunks:
                await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
            await body_send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a server of ASGI spec 2.4 says the client left by raising from send
            self.on_disconnect()
        finally:
            gone.remove_done_callback(self._on_gone)
            gone.cancel()
            await self.chunks.aclose()

    def _on_gone(self, gone: asyncio.Future) -> None:
        if not gone.cancelled():
            gone.exception()  # retrieved: a receive that failed means the client is unreachable as well
            self.on_disconnect()


async def _disconnected(receive: Any) -> None:
    """Returns when the client goes away (or the response is complete: the server says disconnect then too)."""
    while (await receive())["type"] != "http.disconnect":
        pass
