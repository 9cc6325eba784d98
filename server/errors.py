"""JSON errors everywhere: {"error": {"code": "<snake_case>", "message": "<what and how to fix>"}}."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("prefixserve")

_SEND_JSON = "send a JSON object with Content-Type: application/json"
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type"}


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (several times faster than the json module; NaN and infinities become null)."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return FastJSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe(errors: list) -> str:
    if any(err.get("type") == "json_invalid" for err in errors):
        return f"the body is not valid JSON; {_SEND_JSON}"
    if any(tuple(err.get("loc", ())) == ("body",) and err.get("type") in _NOT_AN_OBJECT for err in errors):
        # a JSON array or string, or a body sent without that Content-Type (then it is not read as JSON)
        return f"the body is not a JSON object; {_SEND_JSON}"
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class BodyTooLarge(Exception):
    """Raised by the front middleware when a body passes PREFIXSERVE_MAX_BODY_BYTES."""


class BodyTimeout(Exception):
    """Raised by the front middleware when a body takes longer than PREFIXSERVE_BODY_TIMEOUT to arrive."""


def _is_cut_off(exc: BaseException | None) -> bool:
    """The body stopped coming (too large, too slow, the client gone): the front middleware answers it."""
    return isinstance(exc, BodyTooLarge | BodyTimeout | ClientDisconnect)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        is_json = any(err.get("type") == "json_invalid" for err in errors)
        return error_response(422, "invalid_json" if is_json else "invalid_request", _describe(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI turns any error while reading a JSON body into a bare 400: say what it was
        cause = exc.__cause__
        if _is_cut_off(cause):
            # FastAPI wrapped it in a 400 while reading a JSON body: FrontMiddleware answers it (413, 408, 499)
            raise cause  # type: ignore[misc]
        if isinstance(cause, UnicodeDecodeError):
            return error_response(422, "invalid_json", f"the body is not UTF-8 JSON ({cause}); {_SEND_JSON}")
        if isinstance(cause, RecursionError):
            return error_response(422, "invalid_json", f"the body's JSON is nested too deeply; {_SEND_JSON}")
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed on this request; it has been logged")
