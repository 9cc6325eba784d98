"""Plain data passed between the engine front, the scheduler and the runner. No torch here."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy (exactly HF/PEFT `do_sample=False`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # HF's: seen tokens' logits divided (positive) or multiplied (negative)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    num_beams: int = 1  # beam search (HF's, see beam.py) when > 1: deterministic, tokens known at the end
    length_penalty: float = 1.0  # HF's: a finished beam scores sum(logprobs) / num_tokens ** length_penalty
    early_stopping: bool = False  # HF's: True stops once num_beams hypotheses are finished
    min_tokens: int = 0  # vLLM's: before this many tokens, EOS/stop_token_ids masked, no stop string
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: these end the request (kept in the output, unlike EOS)
    include_stop_str_in_output: bool = False  # vLLM's: the text is cut after the stop string, not before it

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not 0 < self.repetition_penalty <= 100:
            raise ValueError("repetition_penalty must be in (0, 100] (1 = off)")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1 (1 = no beam search)")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        if self.num_beams > 1:
            self._check_beams()

    def _check_beams(self) -> None:
        """Beam search is deterministic and its tokens are only known at the end: what does not fit is refused."""
        refused = [
            name
            for name, is_set in (
                ("temperature", self.temperature != 0),
                ("top_k", self.top_k != 0),
                ("top_p", self.top_p != 1.0),
                ("seed", self.seed is not None),
                ("stop", bool(self.stop)),
                ("ignore_eos", self.ignore_eos),
                ("presence_penalty", self.presence_penalty != 0),
                ("frequency_penalty", self.frequency_penalty != 0),
                ("logprobs", self.logprobs is not None),
                ("min_tokens", self.min_tokens != 0),
                ("stop_token_ids", bool(self.stop_token_ids)),
            )
            if is_set
        ]
        if refused:
            raise ValueError(
                f"num_beams > 1 (beam search) does not take {', '.join(refused)}: beam search is deterministic "
                "(temperature 0, no top_k/top_p/seed) and supports neither stop strings, ignore_eos, "
                "presence/frequency penalties, logprobs, min_tokens nor stop_token_ids; drop them or use num_beams 1"
            )

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation. `prefix` is the pinned device prefix (opaque here) or None for the bare backbone."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefix: Any = None
    prefix_id: str | None = None
    num_prefix_tokens: int = 0
    prefix_key: str | None = None  # the prefix's content (paged KV: requests with one key share its blocks)
    tenant: str | None = None
    # the first choice's request id for every choice of one request with n > 1 (queued together): choices
    # waiting together are admitted together and, paged, run their prompt once and share its blocks
    group: str | None = None
    trace_id: str | None = None  # the HTTP request's X-Request-Id, for log lines about this request
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(
        default_factory=list
    )  # set when it finishes (running: its row holds them)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    first_token_time: float | None = None
    row: int = -1  # the scheduler's row while it runs (its index in the persistent batch's arrays)
    # the scheduler's hook: told once when the request finishes, wherever that happens (see Scheduler)
    on_finish: Callable[[Request], None] | None = field(default=None, repr=False)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            if self.on_finish is not None:
                self.on_finish(self)


@dataclass
class RequestOutput:
    """What the front streams to a client after a step: the new token (if any) and its text delta."""

    request_id: str
    token_id: int | None
    text: str
    is_finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # "numerical_error" (the request's own numbers broke) | "engine_error"
    # a whole response handed over at once when it ends: all its token ids (token_id is then None)
    token_ids: list[int] | None = None
    logprob: float | None = None  # the token's log-probability, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
