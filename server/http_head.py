"""A request's head (request line and headers) is bounded: at most MAX_HEAD_BYTES, arriving within a deadline.

uvicorn's httptools protocol buffers a head that never ends without limit (llhttp keeps a partial header in
memory) and waits forever for a head that arrives slowly or not at all; `--body-timeout` only starts counting
once the head is complete. This subclass counts a head's bytes before the parser sees them and arms a timer
when a connection waits for one: over the size, 431 `headers_too_large`; too slow, 408 `head_timeout` (or, if
not one byte of a request came, the connection is just closed, as uvicorn's keep-alive timeout does).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("prefixserve")

MAX_HEAD_BYTES = 64 << 10  # request line + headers: nginx's default buffers hold 32 KiB


def _error(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedHeadProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose heads are bounded in size and time (`head_timeout` is set by `bounded_head`)."""

    head_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for (the rest of) a request's head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        if self._head_timer is None:  # the first byte of a head after a response
            self._arm()
        room = MAX_HEAD_BYTES - self._head_bytes
        self._head_bytes += len(data)
        if len(data) <= room:
            super().data_received(data)
            return
        super().data_received(data[:room])  # the head may end inside it: the rest is its body
        if self._in_head and not self.transport.is_closing():
            log.info("request head over %d bytes: 431", MAX_HEAD_BYTES)
            message = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
            self._refuse(_error(431, "Request Header Fields Too Large", "headers_too_large", message))
            return
        if not self.transport.is_closing():
            super().data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the timer is armed by the next head's first byte

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined head waits while the request before it is answered
            return
        if self._head_bytes == 0:
            self.transport.close()  # not one byte of a request came
            return
        log.info("request head not received within %g s (--body-timeout): 408", self.head_timeout)
        message = f"the request line and headers did not arrive within {self.head_timeout:g} s"
        self._refuse(_error(408, "Request Timeout", "head_timeout", message))

    def _refuse(self, answer: bytes) -> None:
        self._disarm()
        self.transport.write(answer)
        self.transport.close()


def bounded_head(head_timeout: float) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn.Config(http=...), heads due within `head_timeout` seconds."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"head_timeout": head_timeout})
