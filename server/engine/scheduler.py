"""Waiting and running queues, fair admission and retirement. Pure Python: no torch, no FastAPI.

Every step the scheduler hands the runner three lists: requests to retire (their slots are freed),
requests to prefill (admitted from the waiting queues while slots and the prefill token budget allow),
and running requests to decode. Each slot holds a whole sequence up to the model's positions, and the
front rejects requests that cannot fit before they are queued. A beam-search request of k beams holds k
slots: it is admitted only when k slots are free (while it is first in line, nobody overtakes it), and is
charged k generated tokens per step.

Fairness is the virtual token counter (VTC) of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024): every tenant has a counter of the service it received — prefill tokens x
`prefill_token_cost` + generated tokens x `output_token_cost`, divided by the tenant's weight — and a
free slot goes to the backlogged tenant with the smallest counter (ties: the earliest request). A
tenant that becomes active again is lifted to the smallest counter among active tenants, so idle time
is not banked. The waiting queue is shared, but when it is full only a tenant holding more than its
weighted share of it is refused; a tenant within its share is always queued.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Literal

from server.engine.request import BeamResult, Request, RequestStatus, ScheduledBatch


class QueueFull(RuntimeError):
    """The waiting queue has no room for this tenant's request (-> 429 with Retry-After)."""

    def __init__(self, message: str, code: str = "tenant_queue_full"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in the running batch (KV slots)
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (at least one request always is)
    eos_token_ids: frozenset[int] = frozenset()
    max_queue: int = 1024  # requests waiting for a busy slot; beyond it only tenants within their share
    policy: Literal["fair", "fifo"] = "fair"  # fifo: arrival order and one global queue limit (benchmarks)
    prefill_token_cost: float = 1.0  # VTC's w_p: service charged per prompt token
    output_token_cost: float = 2.0  # VTC's w_q: service charged per generated token (the paper's 2:1)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.policy not in ("fair", "fifo"):
            raise ValueError("policy must be 'fair' or 'fifo'")
        if self.prefill_token_cost < 0 or self.output_token_cost < 0:
            raise ValueError("token costs must be >= 0")


@dataclass
class TenantLoad:
    num_running: int = 0
    num_waiting: int = 0


def _num_slots(requests: list[Request]) -> int:
    """KV slots the requests hold: one each, k for a beam group of k beams."""
    return sum(r.params.num_beams for r in requests)


def _tenant(request: Request) -> str:
    return request.tenant or ""


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: dict[str, deque[Request]] = {}  # per tenant, arrival order; only non-empty ones
        self.running: list[Request] = []
        self.counters: dict[str, float] = {}  # VTC: weighted service received, per tenant
        self.weights: dict[str, float] = {}
        self.load: dict[str, TenantLoad] = {}  # active tenants only (running or waiting)
        self._num_waiting = 0
        self._aborted_waiting: list[Request] = []
        self._arrival = itertools.count()
        self._order: dict[int, int] = {}  # id(request) -> arrival number, for ties and FIFO
        self._floor = 0.0  # the smallest active counter when last seen: what a returning tenant is lifted to

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def requests(self) -> list[Request]:
        """Every running and waiting request."""
        return [*self.running, *(r for queue in self.waiting.values() for r in queue)]

    def has_work(self) -> bool:
        return bool(self._num_waiting or self.running or self._aborted_waiting)

    # -- arrival ------------------------------------------------------------------------------------
    def add(self, request: Request, weight: float = 1.0) -> None:
        """Queue a request, or raise QueueFull when the queue is full and its tenant holds its share."""
        tenant = _tenant(request)
        self._check_room(tenant, weight)
        self.weights[tenant] = weight
        if tenant not in self.load:  # newly active: no banking of idle time
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), self._min_active_counter())
            self.load[tenant] = TenantLoad()
        self.load[tenant].num_waiting += 1
        request.status = RequestStatus.WAITING
        self._order[id(request)] = next(self._arrival)
        self.waiting.setdefault(tenant, deque()).append(request)
        self._num_waiting += 1

    def _check_room(self, tenant: str, weight: float) -> None:
        # requests that free slots will take at the next step are not queued behind anyone
        free_slots = max(0, self.config.max_num_seqs - _num_slots(self.running))
        limit = self.config.max_queue + free_slots
        if self._num_waiting < limit:
            return
        if self.config.policy == "fifo":
            raise QueueFull(f"{self._num_waiting} requests are waiting; retry shortly", "queue_full")
        share = self.queue_share(tenant, weight)
        held = len(self.waiting.get(tenant, ()))
        # within its share a tenant is always queued; the hard cap only guards against weights changing
        if held < share and self._num_waiting < 2 * limit:
            return
        raise QueueFull(
            f"the queue is full and this tenant holds {held} of its {share} waiting places; retry shortly"
        )

    def queue_share(self, tenant: str, weight: float) -> int:
        """Waiting places this tenant may hold when the queue is full: max_queue split by weight among
        the tenants that are waiting (itself included), at least 1."""
        backlogged = {t: self.weights.get(t, 1.0) for t in self.waiting}
        backlogged[tenant] = weight
        total = sum(backlogged.values())
        return max(1, int(self.config.max_queue * weight / total)) if total > 0 else 1

    def _min_active_counter(self) -> float:
        active = [self.counters[t] for t in self.load]
        if active:
            self._floor = min(active)
        if len(self.counters) > 4 * len(self.load) + 1024:
            # an inactive tenant at or below the floor would be lifted to it anyway: forgetting it loses nothing
            for tenant in [t for t, c in self.counters.items() if t not in self.load and c <= self._floor]:
                del self.counters[tenant]
                self.weights.pop(tenant, None)
        return self._floor

    # -- abort ----------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> Request | None:
        """Mark a request aborted; its slot is freed at the next step. Returns it, or None if unknown."""
        for request in self.running:
            if request.request_id == request_id:
                request.finish("abort")
                return request
        for tenant, queue in self.waiting.items():
            for request in queue:
                if request.request_id == request_id:
                    request.finish("abort")
                    queue.remove(request)
                    self._num_waiting -= 1
                    self._leave(tenant, waiting=True)
                    if not queue:
                        del self.waiting[tenant]
                    self._aborted_waiting.append(request)
                    return request
        return None

    # -- the step -------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        finished = [r for r in self.running if r.is_finished]
        decode = [r for r in self.running if not r.is_finished]
        for request in finished:
            self._leave(_tenant(request), waiting=False)
        self._min_active_counter()
        prefill: list[Request] = []
        budget = self.config.max_prefill_tokens
        num_free = self.config.max_num_seqs - _num_slots(decode)
        while self._num_waiting and num_free > 0:
            tenant = self._next_tenant()
            head = self.waiting[tenant][0]
            num_tokens = len(head.prompt_token_ids)
            if (prefill and num_tokens > budget) or _num_slots([head]) > num_free:
                break  # a beam group waits (first in line) until its k slots are free
            num_free -= _num_slots([head])
            request = self._pop(tenant)
            request.status = RequestStatus.RUNNING
            self._charge(request, self.config.prefill_token_cost * num_tokens)
            prefill.append(request)
            budget -= num_tokens
        # waiting requests that were aborted never held a slot: report them as finished, nothing to free
        retired = finished + self._aborted_waiting
        self._aborted_waiting = []
        for request in retired:
            request.status = RequestStatus.FINISHED
            self._order.pop(id(request), None)
        self.running = decode + prefill
        return ScheduledBatch(prefill=prefill, decode=decode, finished=retired)

    def _next_tenant(self) -> str:
        """Fair: the backlogged tenant with the least service (ties: earliest request). FIFO: earliest request."""

        def arrival(tenant: str) -> int:
            return self._order[id(self.waiting[tenant][0])]

        if self.config.policy == "fifo":
            return min(self.waiting, key=arrival)
        # a linear scan over backlogged tenants: fine for hundreds; a heap is the next step for thousands
        return min(self.waiting, key=lambda t: (self.counters[t], arrival(t)))

    def _pop(self, tenant: str) -> Request:
        queue = self.waiting[tenant]
        request = queue.popleft()
        if not queue:
            del self.waiting[tenant]
        self._num_waiting -= 1
        load = self.load[tenant]
        load.num_waiting -= 1
        load.num_running += 1
        return request

    def _leave(self, tenant: str, waiting: bool) -> None:
        load = self.load[tenant]
        if waiting:
            load.num_waiting -= 1
        else:
            load.num_running -= 1
        if load.num_waiting == 0 and load.num_running == 0:
            del self.load[tenant]
            if not self.load:  # the last active tenant: who comes next starts from where it left
                self._floor = max(self._floor, self.counters[tenant])

    def _charge(self, request: Request, service: float) -> None:
        tenant = _tenant(request)
        self.counters[tenant] += service / max(self.weights.get(tenant, 1.0), 1e-9)

    def update(self, batch: ScheduledBatch, token_ids: list[int | BeamResult | None]) -> None:
        """Record one sampled token per sequence of the batch; finish on EOS or length; None = the row failed;
        a BeamResult for a beam group (see beam.py)."""
        for request, token_id in zip(batch.sequences, token_ids, strict=True):
            if request.is_finished:  # aborted while the step ran: drop the token
                continue
            if token_id is None:
                request.finish("error")
                continue
            if isinstance(token_id, BeamResult):
                self._update_beams(request, token_id)
                continue
            self._charge(request, self.config.output_token_cost)
            if token_id in self.config.eos_token_ids and not request.params.ignore_eos:
                request.finish("stop")
                continue
            request.output_token_ids.append(token_id)
            if token_id in request.params.stop_token_ids:
                request.finish("stop")
            elif len(request.output_token_ids) >= request.params.max_new_tokens:
                request.finish("length")

    def _update_beams(self, request: Request, result: BeamResult) -> None:
        """A beam group is charged a generated token per row and step; its tokens come when it is done."""
        self._charge(request, self.config.output_token_cost * result.num_rows)
        if result.token_ids is None:
            return
        tokens = result.token_ids
        ends_on_eos = bool(tokens) and tokens[-1] in self.config.eos_token_ids
        request.output_token_ids.extend(tokens[:-1] if ends_on_eos else tokens)
        request.finish("stop" if ends_on_eos else "length")

    def tenant_load(self) -> dict[str, TenantLoad]:
        """Running and waiting requests of every active tenant (a copy)."""
        return {t: TenantLoad(load.num_running, load.num_waiting) for t, load in self.load.items()}
