"""prefixserve-client: PrefixServeClient, AsyncPrefixServeClient and the prefixctl CLI (httpx only, no torch)."""

from prefixserve_client.client import AsyncPrefixServeClient, PrefixServeClient
from prefixserve_client.errors import (
    AuthenticationError,
    ConnectionError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeError,
    QueueFullError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from prefixserve_client.types import (
    CreatedKey,
    GenerateChoice,
    GenerateResult,
    ModelInfo,
    PrefixInfo,
    PrefixPage,
    StreamEvent,
    TenantInfo,
    TenantUsage,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncPrefixServeClient",
    "AuthenticationError",
    "ConnectionError",
    "CreatedKey",
    "GenerateChoice",
    "GenerateResult",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixInfo",
    "PrefixPage",
    "PrefixServeClient",
    "PrefixServeError",
    "QueueFullError",
    "QuotaExceededError",
    "RateLimitError",
    "ServerError",
    "StreamEvent",
    "TenantInfo",
    "TenantUsage",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "ValidationError",
]
