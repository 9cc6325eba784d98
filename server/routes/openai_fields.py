"""What /v1/completions and /v1/chat/completions share beyond OpenAI's own fields: vLLM's sampling extensions
(the dialect load generators and evaluation harnesses send), stream_options, usage, and the SamplingParams
they make. Each field is honoured or refused by name; none is silently ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server import generation
from server.engine.request import SamplingParams

MAX_STOP_TOKEN_IDS = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(
        False, strict=True, description="a last chunk with usage and no choices"
    )
    continuous_usage_stats: bool | None = Field(
        False, strict=True, description="vLLM's: every chunk carries the usage so far"
    )


class VllmSampling(BaseModel):
    """vLLM's sampling extensions that both OpenAI endpoints take."""

    top_k: int | None = Field(
        None, strict=True, ge=-1, le=1_000_000, description="vLLM's; -1, 0 or null = off"
    )
    min_p: float | None = Field(None, strict=True, ge=0, le=1, description="not supported: 0 or null only")
    ignore_eos: bool | None = Field(False, strict=True, description="vLLM's: EOS does not end the output")
    min_tokens: int | None = Field(
        0,
        strict=True,
        ge=0,
        le=100_000,
        description="vLLM's: EOS, stop_token_ids and stop strings wait for it",
    )
    stop_token_ids: list[int] | None = Field(
        None, strict=True, max_length=MAX_STOP_TOKEN_IDS, description="vLLM's: these tokens end the output"
    )
    include_stop_str_in_output: bool | None = Field(
        False, strict=True, description="vLLM's: the text ends after the stop string instead of before it"
    )
    skip_special_tokens: bool | None = Field(
        True, strict=True, description="vLLM's; special tokens are never rendered: true or null only"
    )
    spaces_between_special_tokens: bool | None = Field(
        True, strict=True, description="vLLM's; special tokens are never rendered: true or null only"
    )

    @model_validator(mode="after")
    def _refuse_unsupported_vllm(self) -> VllmSampling:
        if self.min_p:
            raise ValueError("min_p is not supported: send 0, null or no min_p (top_p and top_k are)")
        if self.skip_special_tokens is False:
            raise ValueError("skip_special_tokens false is not supported: special tokens are never rendered")
        if self.spaces_between_special_tokens is False:
            raise ValueError(
                "spaces_between_special_tokens false is not supported: special tokens are never rendered"
            )
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        return self

    def vllm_params(self) -> dict[str, Any]:
        """The SamplingParams fields these extensions set."""
        return {
            "top_k": max(self.top_k or 0, 0),
            "ignore_eos": bool(self.ignore_eos),
            "min_tokens": self.min_tokens or 0,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "include_stop_str_in_output": bool(self.include_stop_str_in_output),
        }


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop`: a string, a list, or null (no stop string)."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def sampling_params(body: Any, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams from an OpenAI body (DecodingOptions + VllmSampling + temperature, top_p, seed, stop)."""
    decoding = body.penalties()
    decoding["logprobs"] = logprobs
    return generation.sampling_params(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop_strings(body.stop),
        **decoding,
        **body.vllm_params(),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
