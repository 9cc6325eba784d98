"""Decoding options both generation endpoints take (HF / OpenAI meanings), and per-token logprobs rendering."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.request import RequestOutput, SamplingParams
from server.errors import ServiceError

MAX_N = 16
MAX_LOGPROBS = 20


class DecodingOptions(BaseModel):
    """Fields shared by /v1/generate and /v1/completions. Strict: a value of the wrong JSON type is a 422
    naming the field (`true` is not 1, `"yes"` is not true), though an integer is a fine float."""

    model_config = ConfigDict(strict=True)

    n: int = Field(
        1, ge=1, le=MAX_N, description="completions per prompt; with a seed, completion i uses seed + i"
    )
    num_beams: int = Field(1, ge=1, le=16, description="beam search width (1 = no beam search)")
    length_penalty: float = Field(
        1.0, ge=-10, le=10, allow_inf_nan=False, description="HF's, for beam search"
    )
    early_stopping: bool = Field(False, description="HF's, for beam search")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each token's log-probability and this many top alternatives"
    )
    repetition_penalty: float = Field(1.0, gt=0, le=100, allow_inf_nan=False, description="HF's; 1 = off")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="OpenAI's")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="OpenAI's")

    @model_validator(mode="after")
    def _check_beams(self) -> DecodingOptions:
        # beam search gives one deterministic answer; the sampling fields it does not take are refused by
        # SamplingParams (-> 422 invalid_sampling naming them)
        if self.num_beams > 1 and self.n > 1:
            raise ValueError(
                "n > 1 with num_beams > 1 is not supported (beam search has one answer): use n 1"
            )
        return self

    def penalties(self) -> dict[str, Any]:
        """The decoding fields SamplingParams takes as they are (penalties, logprobs, beam search)."""
        return {
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logprobs": self.logprobs,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "early_stopping": self.early_stopping,
        }


def per_completion(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of the sampling settings; with a seed, completion i uses seed + i (wrapping below 2^63)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


class TokenTexts:
    """Text of single tokens (for logprobs alternatives), decoded with a private tokenizer copy under a lock."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            with self._lock:
                text = self._tokenizer.decode([token_id])
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def token_texts(state: Any) -> TokenTexts:
    texts = getattr(state, "token_texts", None)
    if texts is None:
        import copy

        texts = state.token_texts = TokenTexts(copy.deepcopy(state.engine.backbone.tokenizer))
    return texts


def generate_logprob(output: RequestOutput, texts: TokenTexts) -> dict[str, Any]:
    """One token's entry in /v1/generate's `logprobs` list."""
    assert output.token_id is not None
    return {
        "token_id": output.token_id,
        "logprob": output.logprob,
        "top": [{"token_id": t, "text": texts(t), "logprob": lp} for t, lp in output.top_logprobs or []],
    }


class LegacyLogprobs:
    """OpenAI's legacy completions `logprobs` object, built token by token."""

    def __init__(self, texts: TokenTexts, offset: int = 0) -> None:
        self.texts = texts
        self.offset = offset  # where the next token's text starts in the returned text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, output: RequestOutput) -> dict[str, Any]:
        """Record one token; returns the entry for this token alone (for a streamed chunk)."""
        assert output.token_id is not None
        text = self.texts(output.token_id)
        top = {self.texts(t): lp for t, lp in output.top_logprobs or []}
        entry = {
            "tokens": [text],
            "token_logprobs": [output.logprob],
            "top_logprobs": [top],
            "text_offset": [self.offset],
        }
        self.tokens.append(text)
        self.token_logprobs.append(output.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def refuse(message: str) -> ServiceError:
    return ServiceError(422, "invalid_request", message)
