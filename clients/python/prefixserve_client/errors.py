"""Typed errors. Every failure the client reports is a `PrefixServeError`; the subclass says what kind.

The server answers errors as ``{"error": {"code": "<snake_case>", "message": "<what and how to fix>"}}``;
``code`` and ``message`` are copied from that body, ``status`` is the HTTP status (None when no response came).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping


class PrefixServeError(Exception):
    """Base class: the request failed. `status` is the HTTP status, or None for client-side failures."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error"):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        where = f" ({self.status})" if self.status is not None else ""
        return f"{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class AuthenticationError(PrefixServeError):
    """401: no API key, or one the server does not know. Set PREFIXSERVE_API_KEY or pass api_key=."""


class PermissionDeniedError(PrefixServeError):
    """403: the key is valid but may not do this (e.g. a tenant key calling an admin endpoint)."""


class NotFoundError(PrefixServeError):
    """404: no such prefix or key — or one this key may not see (the server gives no hint which)."""


class ValidationError(PrefixServeError):
    """400/422: the request or the uploaded prefix is invalid; the message says what to fix."""


class PayloadTooLargeError(PrefixServeError):
    """413: the upload is larger than the server's body size limit."""


class RateLimitError(PrefixServeError):
    """429: too many requests (or the queue is full). `retry_after` is in seconds when the server says."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        code: str = "rate_limited",
        retry_after: float | None = None,
    ):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class QuotaExceededError(RateLimitError):
    """429 `quota_exceeded`: the tenant is over one of its quotas (max_concurrent, requests_per_minute,
    tokens_per_minute); `retry_after` says when the per-minute count will be back under it."""


class QueueFullError(RateLimitError):
    """429 `tenant_queue_full` (the queue is full and this tenant is over its weighted share of it) or
    `queue_full`; retry after `retry_after` seconds."""


class ServerError(PrefixServeError):
    """5xx: the server failed or is not ready (503 while the store is unreachable)."""


class ConnectionError(PrefixServeError, builtins.ConnectionError):  # noqa: A001 - the name the contract uses
    """The server could not be reached, or the connection broke or timed out before a full answer came."""


_BY_STATUS: dict[int, type[PrefixServeError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
}

# 429s whose code says more than the status: how long a wait helps depends on which it is
_RATE_LIMITS_BY_CODE: dict[str, type[RateLimitError]] = {
    "quota_exceeded": QuotaExceededError,
    "tenant_queue_full": QueueFullError,
    "queue_full": QueueFullError,
}


def parse_error_body(body: bytes | str | Mapping[str, object] | None) -> tuple[str | None, str | None]:
    """(code, message) from a `{"error": {...}}` body, or (None, None) when it is not one."""
    data: object = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            return None, None
    if not isinstance(data, Mapping):
        return None, None
    error = data.get("error")
    if isinstance(error, Mapping):
        code, message = error.get("code"), error.get("message")
        return (str(code) if code is not None else None, str(message) if message is not None else None)
    detail = data.get("detail")  # a framework default (FastAPI) that slipped past the server's handlers
    if detail is not None:
        return None, detail if isinstance(detail, str) else json.dumps(detail)
    return None, None


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare enough that we do not parse it


def error_from_response(
    status: int, body: bytes | str | Mapping[str, object] | None, headers: Mapping[str, str] | None = None
) -> PrefixServeError:
    """Map an HTTP error answer to the matching typed error."""
    code, message = parse_error_body(body)
    if message is None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
        message = text.strip()[:500] or f"HTTP {status} with no error body"
    code = code or f"http_{status}"
    if status == 429:
        retry_after = _parse_retry_after((headers or {}).get("retry-after"))
        limit_cls = _RATE_LIMITS_BY_CODE.get(code, RateLimitError)
        return limit_cls(message, status=status, code=code, retry_after=retry_after)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else PrefixServeError
    return cls(message, status=status, code=code)


__all__ = [
    "AuthenticationError",
    "ConnectionError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixServeError",
    "QueueFullError",
    "QuotaExceededError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
    "error_from_response",
    "parse_error_body",
]
