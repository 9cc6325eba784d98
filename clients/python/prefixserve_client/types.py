"""Typed results. Each keeps the server's JSON in `raw`, so fields added to the contract later stay reachable."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        data = data or {}
        return cls(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)))


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position, with its log-probability."""

    token_id: int
    text: str
    logprob: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TopLogprob:
        return cls(int(data["token_id"]), str(data.get("text") or ""), _logprob(data.get("logprob")))


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (of the distribution it was drawn from: after temperature, top-k,
    top-p and the penalties) and the `top` alternatives asked for with `logprobs=N`, most likely first."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        """The token's text when it is among the alternatives (the server sends text for those only)."""
        return next((t.text for t in self.top if t.token_id == self.token_id), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLogprob:
        top = [TopLogprob.from_dict(t) for t in data.get("top") or []]
        return cls(int(data["token_id"]), _logprob(data.get("logprob")), top)


def _logprob(value: Any) -> float:
    return float("-inf") if value is None else float(value)


def _logprobs(data: Any) -> list[TokenLogprob] | None:
    return None if data is None else [TokenLogprob.from_dict(entry) for entry in data]


@dataclass(frozen=True)
class GenerateChoice:
    """One of the `n` completions of a prompt (GenerateResult.choices, when n > 1)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateChoice:
        return cls(
            index=int(data.get("index", 0)),
            text=str(data.get("text", "")),
            token_ids=[int(t) for t in data.get("token_ids", [])],
            finish_reason=str(data.get("finish_reason", "")),
            logprobs=_logprobs(data.get("logprobs")),
        )


@dataclass(frozen=True)
class GenerateResult:
    """The answer of POST /v1/generate. `token_ids` are the generated ids only (no prompt, no final EOS).

    The top-level fields are the first completion's. `logprobs` is there when asked for (`logprobs=N`), one
    entry per token id; `choices` holds every completion when `n > 1` (else None), and `usage.completion_tokens`
    counts the tokens of all of them.
    """

    id: str
    prefix: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    choices: list[GenerateChoice] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def completions(self) -> list[GenerateChoice]:
        """Every completion: `choices` when n > 1, else the one completion as a choice of index 0."""
        if self.choices is not None:
            return self.choices
        return [GenerateChoice(0, self.text, self.token_ids, self.finish_reason, self.logprobs)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateResult:
        choices = data.get("choices")
        return cls(
            id=str(data.get("id", "")),
            prefix=data.get("prefix"),
            text=str(data.get("text", "")),
            token_ids=[int(t) for t in data.get("token_ids", [])],
            finish_reason=str(data.get("finish_reason", "")),
            usage=Usage.from_dict(data.get("usage")),
            logprobs=_logprobs(data.get("logprobs")),
            choices=None if choices is None else [GenerateChoice.from_dict(c) for c in choices],
            raw=data,
        )


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of a streamed generation.

    Token events carry `token_id` and `text` (and `logprobs` when asked for); the last event of a completion
    carries `finish_reason` and `usage` (and `text` is "" there unless the server put text in it), so
    `print(event.text, end="")` works for all. With n > 1 the completions come one after another, each
    ending with its own last event; `index` says which completion an event belongs to (0 when n is 1).
    """

    token_id: int | None = None
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: TokenLogprob | None = None
    index: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamEvent:
        token_id = data.get("token_id")
        usage = data.get("usage")
        logprobs = data.get("logprobs")
        return cls(
            token_id=int(token_id) if token_id is not None else None,
            text=str(data.get("text") or ""),
            finish_reason=data.get("finish_reason"),
            usage=Usage.from_dict(usage) if usage is not None else None,
            logprobs=TokenLogprob.from_dict(logprobs) if logprobs is not None else None,
            index=int(data.get("index") or 0),
            raw=data,
        )


@dataclass(frozen=True)
class PrefixInfo:
    """Metadata of a stored prefix (GET /v1/prefixes/{tenant}/{name}).

    `created` is set only on the result of an upload: True when the id was new (201), False when an
    existing prefix was replaced (200).
    """

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
    model_type: str | None = None
    prompt_template: str | None = None
    created: bool | None = field(default=None, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], created: bool | None = None) -> PrefixInfo:
        tenant, _, name = str(data.get("id", "")).partition("/")
        return cls(
            id=str(data.get("id", "")),
            tenant=str(data.get("tenant", tenant)),
            name=str(data.get("name", name)),
            num_virtual_tokens=int(data.get("num_virtual_tokens", 0)),
            bytes=int(data.get("bytes", 0)),
            dtype=str(data.get("dtype", "")),
            sha256=str(data.get("sha256", "")),
            source=str(data.get("source", "")),
            targets=[str(t) for t in data.get("targets", [])],
            public=bool(data.get("public", False)),
            created_at=float(data.get("created_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
            model_type=data.get("model_type"),
            prompt_template=data.get("prompt_template"),
            created=created,
            raw=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """The server's JSON when there is one, else the fields (for printing)."""
        if self.raw:
            return dict(self.raw)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in {"raw", "created"}}


@dataclass(frozen=True)
class PrefixPage:
    """One page of GET /v1/prefixes; pass `next_cursor` to get the next (None: this was the last)."""

    prefixes: list[PrefixInfo]
    next_cursor: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixPage:
        return cls(
            [PrefixInfo.from_dict(p) for p in data.get("prefixes", [])], data.get("next_cursor") or None
        )


class CreatedKey(NamedTuple):
    """A new tenant key. `key` is the secret: the server shows it once and keeps only its hash."""

    key_id: str
    key: str


@dataclass(frozen=True)
class ModelInfo:
    """An entry of GET /v1/models (OpenAI shape): the backbone's name and each prefix visible to the key."""

    id: str
    object: str = "model"
    owned_by: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(str(data.get("id", "")), str(data.get("object", "model")), data.get("owned_by"), raw=data)


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's load now: requests running and queued on the replica that answered, and what it used in the
    last minute (sliding estimate; across replicas when the server's store is Redis)."""

    running: int = 0
    queued: int = 0
    requests_last_minute: int = 0
    tokens_last_minute: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TenantUsage:
        data = data or {}
        return cls(
            running=int(data.get("running", 0)),
            queued=int(data.get("queued", 0)),
            requests_last_minute=int(data.get("requests_last_minute", 0)),
            tokens_last_minute=int(data.get("tokens_last_minute", 0)),
        )


def _limit(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class TenantInfo:
    """A tenant's settings and usage (GET/PUT /v1/tenants/{tenant}). A quota of None means no limit."""

    tenant: str
    weight: float = 1.0  # fair-share weight
    max_concurrent: int | None = None  # running + queued requests on one replica
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + generated tokens
    usage: TenantUsage = field(default_factory=TenantUsage)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TenantInfo:
        weight = data.get("weight")
        return cls(
            tenant=str(data.get("tenant", "")),
            weight=1.0 if weight is None else float(weight),
            max_concurrent=_limit(data.get("max_concurrent")),
            requests_per_minute=_limit(data.get("requests_per_minute")),
            tokens_per_minute=_limit(data.get("tokens_per_minute")),
            usage=TenantUsage.from_dict(data.get("usage")),
            raw=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """The server's JSON when there is one, else the fields (for printing)."""
        if self.raw:
            return dict(self.raw)
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in {"raw", "usage"}}
        return {**data, "usage": {f.name: getattr(self.usage, f.name) for f in fields(self.usage)}}
