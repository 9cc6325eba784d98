"""prefixserve-client: PrefixServeClient, AsyncPrefixServeClient and the prefixctl CLI (httpx only, no torch)."""

from prefixserve_client.client import AsyncPrefixServeClient, PrefixServeClient
from prefixserve_client.errors import (
    AuthenticationError,
    ConnectionError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from prefixserve_client.types import (
    CreatedKey,
    GenerateResult,
    ModelInfo,
    PrefixInfo,
    PrefixPage,
    StreamEvent,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncPrefixServeClient",
    "AuthenticationError",
    "ConnectionError",
    "CreatedKey",
    "GenerateResult",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixInfo",
    "PrefixPage",
    "PrefixServeClient",
    "PrefixServeError",
    "RateLimitError",
    "ServerError",
    "StreamEvent",
    "Usage",
    "ValidationError",
]
