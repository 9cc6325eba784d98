"""Waiting and running queues, admission and retirement. Pure Python: no torch, no FastAPI.

Every step the scheduler hands the runner three lists: requests to retire (their slots are freed),
requests to prefill (admitted from the waiting queue in arrival order while slots and the prefill
token budget allow), and running requests to decode. Admission needs no KV accounting beyond slots:
each slot holds a whole sequence up to the model's positions, and the front rejects requests that
cannot fit before they are queued.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.engine.request import Request, RequestStatus, ScheduledBatch


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in the running batch (KV slots)
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (at least one request always is)
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Mark a request aborted; its slot is freed at the next step. Returns it, or None if unknown."""
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                request.finish("abort")
                return request
        return None

    def schedule(self) -> ScheduledBatch:
        finished = [r for r in self.running if r.is_finished]
        decode = [r for r in self.running if not r.is_finished]
        retired_waiting = [r for r in self.waiting if r.is_finished]
        if retired_waiting:
            self.waiting = deque(r for r in self.waiting if not r.is_finished)
        prefill: list[Request] = []
        budget = self.config.max_prefill_tokens
        while self.waiting and len(decode) + len(prefill) < self.config.max_num_seqs:
            num_tokens = len(self.waiting[0].prompt_token_ids)
            if prefill and num_tokens > budget:
                break
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            prefill.append(request)
            budget -= num_tokens
        for request in finished + retired_waiting:
            request.status = RequestStatus.FINISHED
        self.running = decode + prefill
        # waiting requests that were aborted never held a slot: report them as finished, nothing to free
        return ScheduledBatch(prefill=prefill, decode=decode, finished=finished + retired_waiting)

    def update(self, batch: ScheduledBatch, token_ids: list[int]) -> None:
        """Record one sampled token per sequence of the batch; finish on EOS or length."""
        for request, token_id in zip(batch.sequences, token_ids, strict=True):
            if request.is_finished:  # aborted while the step ran: drop the token
                continue
            if token_id in self.config.eos_token_ids and not request.params.ignore_eos:
                request.finish("stop")
                continue
            request.output_token_ids.append(token_id)
            if len(request.output_token_ids) >= request.params.max_new_tokens:
                request.finish("length")
