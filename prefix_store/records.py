"""What every store backend shares: prefix ids, metadata and key records, page cursors, the errors.

Backends (local.py, redis.py) import from here, and store.py (the protocol and open_store) imports the
backends: nothing imports back.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prefix_store.format import ALLOWED_DTYPES, Prefix

ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidId(ValueError):
    pass


class PublicPrefixError(RuntimeError):
    """A tenant's write or delete found the stored prefix public: only the admin may replace or delete it.
    Stores check this and write in one atomic step, so a publish racing the tenant's write always wins."""


class StoreUnavailable(RuntimeError):
    """The backing store cannot be reached (e.g. Redis down). Callers answer 503."""


def check_id_part(part: str, what: str) -> str:
    if not ID_PART.fullmatch(part) or part in {".", ".."}:
        raise InvalidId(
            f"{what} {part!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return part


def split_id(prefix_id: str) -> tuple[str, str]:
    """'<tenant>/<name>' -> (tenant, name), or InvalidId."""
    parts = prefix_id.split("/")
    if len(parts) != 2:
        raise InvalidId(f"prefix id {prefix_id!r} must look like <tenant>/<name>")
    return check_id_part(parts[0], "tenant"), check_id_part(parts[1], "name")


@dataclass
class PrefixMeta:
    """What GET /v1/prefixes/{id} answers, plus what the server needs to load it."""

    id: str
    tenant: str
    name: str
    num_virtual_tokens: int
    bytes: int
    dtype: str
    sha256: str
    source: str  # "native" | "peft"
    targets: list[str]
    public: bool
    created_at: float
    updated_at: float
    model_type: str
    prompt_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def version(self) -> str:
        """Changes whenever the stored bytes or visibility change: a cache key that is never stale."""
        return f"{self.sha256}:{self.updated_at}"


def make_meta(
    prefix_id: str, prefix: Prefix, data: bytes, source: str, public: bool, created_at: float | None = None
) -> PrefixMeta:
    tenant, name = split_id(prefix_id)
    now = time.time()
    return PrefixMeta(
        id=prefix_id,
        tenant=tenant,
        name=name,
        num_virtual_tokens=prefix.num_virtual_tokens,
        bytes=len(data),
        dtype=ALLOWED_DTYPES[prefix.dtype],
        sha256=hashlib.sha256(data).hexdigest(),
        source=source,
        targets=prefix.target_names(),
        public=public,
        created_at=created_at if created_at is not None else now,
        updated_at=now,
        model_type=prefix.model_type,
        prompt_template=prefix.prompt_template,
    )


@dataclass(frozen=True)
class KeyRecord:
    """A tenant's API key, stored only as a hash. `tenant` is '*' for nothing; admin keys are not stored."""

    key_id: str
    tenant: str
    key_hash: str  # hex sha256 of the whole secret key
    created_at: float


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str:
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidId("cursor is malformed; pass next_cursor from the previous page unchanged") from exc
