"""The one pure-ASGI layer every HTTP request passes before the routes.

It gives the request its X-Request-Id (for the response and every log line about it), bounds the body (size:
413; time to arrive: 408), answers a client gone before its body arrived without a 5xx, serves HEAD as GET
without the body, answers OPTIONS with the methods the path takes (and fixes the `allow` of a 405 to list them
all), answers the liveness probe (/healthz) itself, tags the replica and counts the request by route and
status, and refuses a tenant's generate that the door (server/door.py) knows is refused now. One layer, no
Starlette `Request` objects:
a refused request should cost the server as little as possible.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from server.errors import BodyTimeout, BodyTooLarge, ServiceError
from server.logs import request_id_var, sanitise_request_id

log = logging.getLogger("prefixserve")

# The `send` this layer was given, in the scope for the body messages of a streamed response (SseResponse): the
# layers between here and the routes watch only the start message, so a stream's many writes skip them
BODY_SEND = "prefixserve.body_send"
HEALTHZ = SimpleNamespace(path="/healthz")  # what the request counter reads as its route
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request": counted, never sent to anyone


class FrontMiddleware:
    def __init__(self, app: Any, max_body_bytes: int, body_timeout: float, replica: str):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.replica = replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = declared = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
            elif name == b"content-length":
                declared = value
        request_id = sanitise_request_id(given.decode("latin-1") if given is not None else None)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        method = scope["method"]
        if method == "HEAD":  # every GET route answers HEAD: the same headers, no body
            scope = {**scope, "method": "GET"}
        else:
            scope[BODY_SEND] = send
        status = [CLIENT_CLOSED, False]  # the response's code, and whether it started
        stamp = [(b"x-request-id", request_id.encode()), (b"x-prefixserve-replica", self.replica)]

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                if message["status"] == 405:  # Starlette names only the first route's methods
                    headers = [h for h in headers if h[0].lower() != b"allow"]
                    headers.append((b"allow", ", ".join(allowed_methods(scope)).encode()))
                message["headers"] = [*headers, *stamp]
            elif method == "HEAD" and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            if scope["path"] == "/healthz" and method in ("GET", "HEAD"):
                # the liveness probe: answered here, without routing (GET /healthz in the API documents it)
                await _send_json(tagged_send, 200, {"status": "ok"})
                scope["route"] = HEALTHZ
            elif method == "OPTIONS":
                await self._options(scope, tagged_send)
            elif declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise BodyTooLarge
            elif (refused := _door_refusal(scope)) is not None:
                # a tenant refused now is told so before routing, its body or the store: a flood costs little
                await _send_json(tagged_send, refused.status, _error(refused), _headers(refused))
                scope["route"] = SimpleNamespace(path=scope["path"])
            else:
                await self.app(scope, self._bounded(receive, declared), tagged_send)
        except (BodyTooLarge, BodyTimeout, ClientDisconnect) as exc:
            if status[1]:
                raise
            await self._cut_off(exc, tagged_send)
        finally:
            request_id_var.reset(token)
            self._count(scope, status[0])

    def _bounded(self, receive: Any, declared: bytes | None) -> Any:
        """`receive` for the request's body: at most max_body_bytes, all of it within body_timeout seconds.
        Once the body is in, the server's next message (the disconnect) is waited for without a deadline."""
        if declared == b"0":
            return receive  # nothing to bound: a GET, or a POST without a body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received, done = 0, False

        async def bounded_receive() -> dict:
            nonlocal received, done
            if done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
                done = not message.get("more_body", False)
            return message

        return bounded_receive

    async def _options(self, scope: dict, send: Any) -> None:
        methods = allowed_methods(scope)
        if not methods:
            await _send_json(send, 404, {"error": {"code": "not_found", "message": "Not Found"}})
            return
        # 200 with the list as JSON too: every answer of this API is JSON
        await _send_json(send, 200, {"allow": methods}, [(b"allow", ", ".join(methods).encode())])

    async def _cut_off(self, exc: Exception, send: Any) -> None:
        if isinstance(exc, ClientDisconnect):
            # nobody reads this answer; it is sent so the server sees a finished response (no error logged)
            log.info("client disconnected before its request body arrived")
            await _send_json(send, CLIENT_CLOSED, {"error": {"code": "client_closed", "message": "gone"}})
        elif isinstance(exc, BodyTimeout):
            log.info("request body not received within %g s (--body-timeout): 408", self.body_timeout)
            message = (
                f"the request body did not arrive within {self.body_timeout:g} s (PREFIXSERVE_BODY_TIMEOUT)"
            )
            error = {"error": {"code": "body_timeout", "message": message}}
            await _send_json(send, 408, error, close=True)
        else:
            message = f"the request body is over {self.max_body_bytes} bytes (PREFIXSERVE_MAX_BODY_BYTES)"
            await _send_json(send, 413, {"error": {"code": "body_too_large", "message": message}})

    @staticmethod
    def _count(scope: dict, code: int) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if metrics is not None:
            metrics.requests.labels(endpoint, str(code)).inc()


def _door_refusal(scope: dict) -> ServiceError | None:
    door = getattr(scope["app"].state, "door", None) if "app" in scope else None  # None until start-up ends
    return None if door is None else door.refusal(scope["app"].state, scope)


def _error(exc: ServiceError) -> dict:
    return {"error": {"code": exc.code, "message": exc.message}}


def _headers(exc: ServiceError) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]


def allowed_methods(scope: dict) -> list[str]:
    """The methods some route takes at this path, HEAD with GET, OPTIONS whenever there is one (sorted)."""
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    # asked method by method: a route (or an included router) answers FULL for the methods it takes
    methods = {
        method
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"}) if methods else []


async def _send_json(
    send: Any, status: int, data: dict, extra: list[tuple[bytes, bytes]] | None = None, close: bool = False
) -> None:
    body = orjson.dumps(data)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    if close:  # the rest of a slow body is not waited for: the connection ends with this answer
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
