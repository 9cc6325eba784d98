"""Waiting and running queues, fair admission and retirement. Pure Python: no torch, no FastAPI.

Every step the scheduler hands the runner three lists: requests to retire (their slots are freed),
requests to prefill (admitted from the waiting queues while slots and the prefill token budget allow),
and running requests to decode. A running request holds a *row*: its index in `RunningRows`' arrays
(generated tokens, lengths, limits, tenant) from the step it joins to the step it leaves, so a step's
tokens are recorded, checked for EOS and length, and charged to their tenants by array operations; a
request that finishes anywhere (EOS here, a stop string or an abort in the front) tells the scheduler
through its `on_finish` hook, so finding who leaves is no scan of the running rows. Each slot holds a whole sequence up to the model's positions, and the
front rejects requests that cannot fit before they are queued. A beam-search request of k beams holds k
slots: it is admitted only when k slots are free (while it is first in line, nobody overtakes it), and is
charged k generated tokens per step.

With the paged KV layout (a `BlockPool`, block_pool.py) admission is also by free blocks, running rows take a
block when they cross into one, and when none is left the tenant furthest over its share (VTC) loses its latest
request: preempted, it keeps its row and tokens, waits first in its tenant's line and resumes where it was. The
choices of one request (`n` > 1, queued together) join together as rows and blocks allow: the first runs the
prompt, the others fork from it (`StepInput.forks`) and share its whole blocks.

Fairness is the virtual token counter (VTC) of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024): every tenant has a counter of the service it received — prefill tokens x
`prefill_token_cost` + generated tokens x `output_token_cost`, divided by the tenant's weight — and a
free slot goes to the backlogged tenant with the smallest counter (ties: fewer running, then earliest). A
tenant that becomes active again is lifted to the smallest counter among active tenants, so idle time
is not banked. VTC alone keeps a light tenant waiting for the next turnover of a flood's rows; so when every
row is taken and a tenant with nothing running waits (its weighted share being at least one row), the tenant
furthest over its share loses its latest request, preempted as above, and the waiting one joins at once
(`preempt_for_share`). The waiting queue is shared, but when it is full only a tenant holding more than its
weighted share of it is refused; a tenant within its share is always queued.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from server.engine.block_pool import BlockPool, SeqBlocks
from server.engine.request import Request, RequestStatus
from server.engine.step import BeamResult, StepInput, StepOutput, put_ids


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
    # a left row is taken again one schedule() later: the answer of a step sent before it left (the engine
    # overlapping steps) still names it, and must not be read as its next occupant's
    row_cooldown: bool = False
    # paged: tokens a running row writes beyond those recorded when the next schedule() runs (1 when the engine
    # overlaps steps: the step in flight writes one more), so a row's next block is granted that much earlier
    num_ahead: int = 0
    # every row taken and a tenant with nothing running waits: preempt the tenant furthest over its share (the
    # runner must resume a preempted row by recomputing it: decoder-only families, in the engine's process)
    preempt_for_share: bool = False

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


@dataclass
class Progress:
    """What one update recorded: the rows that got a token (their tokens and output lengths after it) and the
    requests it finished (EOS, length, failed rows, done beam groups)."""

    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_output: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    finished: list[Request] = field(default_factory=list)


class RunningRows:
    """The running requests' state by row, in preallocated arrays; a row is taken on join, given back on leave
    (with `cooldown`, at the next cool_down(): twice the rows, so that a full batch can turn over)."""

    def __init__(self, max_rows: int, cooldown: bool = False):
        max_rows = 2 * max_rows if cooldown else max_rows
        self.requests: list[Request | None] = [None] * max_rows
        self._free = list(reversed(range(max_rows)))
        self._cooling: list[int] | None = [] if cooldown else None
        self.num_output = np.zeros(max_rows, dtype=np.int64)
        self.max_new = np.zeros(max_rows, dtype=np.int64)
        self.ignore_eos = np.zeros(max_rows, dtype=bool)
        self.is_beam = np.zeros(max_rows, dtype=bool)
        self.is_done = np.zeros(max_rows, dtype=bool)  # finished: tokens of a step that ran on are dropped
        self.tenant = np.zeros(max_rows, dtype=np.int64)  # index into `tenants`
        self.tokens = np.zeros((max_rows, 16), dtype=np.int64)  # generated tokens (widened as needed)
        self.has_stop_ids = np.zeros(max_rows, dtype=bool)
        self.stop_ids = np.full((max_rows, 1), -1, dtype=np.int64)  # stop_token_ids, -1 padded (widened)
        self.tenants: list[str] = []
        self._tenant_index: dict[str, int] = {}

    @property
    def capacity(self) -> int:
        return len(self.requests)

    def join(self, request: Request) -> None:
        if not self._free:  # preempted requests keep their rows while they wait: rows may outnumber slots
            self._grow()
        row = request.row = self._free.pop()
        params = request.params
        self.requests[row] = request
        self.num_output[row] = 0
        self.max_new[row] = params.max_new_tokens
        self.ignore_eos[row] = params.ignore_eos
        self.is_beam[row] = params.num_beams > 1
        self.is_done[row] = False
        self.tenant[row] = self._tenant_of(_tenant(request))
        self.has_stop_ids[row] = bool(params.stop_token_ids)
        if params.stop_token_ids:  # a row without them never reads its (stale) entries
            self.stop_ids = put_ids(self.stop_ids, row, params.stop_token_ids)
        if params.max_new_tokens > self.tokens.shape[1]:
            width = max(params.max_new_tokens, 2 * self.tokens.shape[1])
            self.tokens = np.pad(self.tokens, ((0, 0), (0, width - self.tokens.shape[1])))

    def _grow(self) -> None:
        """Twice the rows: the arrays padded, the new rows free."""
        n = len(self.requests)
        self.requests += [None] * n
        self._free = list(reversed(range(n, 2 * n)))
        for name in ("num_output", "max_new", "ignore_eos", "is_beam", "is_done", "tenant", "has_stop_ids"):
            setattr(self, name, _padded(getattr(self, name), 2 * n))
        self.tokens = _padded(self.tokens, 2 * n)
        self.stop_ids = _padded(self.stop_ids, 2 * n, fill=-1)

    def leave(self, request: Request) -> None:
        self.requests[request.row] = None
        (self._free if self._cooling is None else self._cooling).append(request.row)

    def cool_down(self) -> None:
        """The rows left before the last schedule() can be taken again."""
        if self._cooling:
            self._free += self._cooling
            self._cooling = []

    def token_ids(self, row: int) -> list[int]:
        return self.tokens[row, : self.num_output[row]].tolist()

    def _tenant_of(self, tenant: str) -> int:
        index = self._tenant_index.get(tenant)
        if index is None:
            index = self._tenant_index[tenant] = len(self.tenants)
            self.tenants.append(tenant)
        return index


def _padded(array: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    """`array` with rows appended up to `rows` (filled with `fill`)."""
    pad = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad, constant_values=fill)


def _tenant(request: Request) -> str:
    return request.tenant or ""


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockPool | None = None):
        self.config = config
        # the paged KV layout: admission also by free blocks; a row's blocks are released when it leaves
        self.blocks = blocks
        # paged: running rows that take blocks as they grow (not beam groups), their own blocks and prompt length
        self.rows = RunningRows(config.max_num_seqs, config.row_cooldown)
        self._is_growing = np.zeros(self.rows.capacity, dtype=bool)
        self._num_own_blocks = np.zeros(self.rows.capacity, dtype=np.int64)
        self._num_prompt = np.zeros(self.rows.capacity, dtype=np.int64)
        self._preempted: dict[int, Request] = {}  # by row (kept while it waits): requests to resume
        self._finished_preempted: list[Request] = []  # preempted, then finished (aborted, a stop string)
        self.num_preemptions = 0  # paged: the blocks ran out
        self.num_share_preemptions = 0  # every row taken and a starved tenant waited (preempt_for_share)
        self.waiting: dict[str, deque[Request]] = {}  # per tenant, arrival order; only non-empty ones
        self.running: list[Request] = []  # in no particular order: a leaving request's place takes the last
        self.num_beam_groups = (
            0  # running requests with num_beams > 1 (the engine does not overlap their steps)
        )
        self._num_running_slots = 0  # KV slots the running requests hold
        self._finishing: list[Request] = []  # running requests finished since the last schedule()
        self._eos = np.array(sorted(config.eos_token_ids), dtype=np.int64)
        self.counters: dict[str, float] = {}  # VTC: weighted service received, per tenant
        self.weights: dict[str, float] = {}
        self.load: dict[str, TenantLoad] = {}  # active tenants only (running or waiting)
        self._num_waiting = 0
        self._aborted_waiting: list[Request] = []
        self._arrival = itertools.count()
        self._order: dict[int, int] = {}  # id(request) -> arrival number, for ties and FIFO
        self._place: dict[int, int] = {}  # id(request) -> its index in self.running
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

    def check_room(self, tenant: str, weight: float, num: int = 1) -> None:
        """Raise QueueFull unless `num` more requests of `tenant` would all be queued now."""
        self._check_room(tenant, weight, num - 1)

    def _check_room(self, tenant: str, weight: float, num_before: int = 0) -> None:
        """Room for one more request of `tenant` after `num_before` more of its own."""
        # requests that free slots will take at the next step are not queued behind anyone
        free_slots = max(0, self.config.max_num_seqs - self._num_running_slots)
        limit = self.config.max_queue + free_slots
        num_waiting = self._num_waiting + num_before
        if num_waiting < limit:
            return
        if self.config.policy == "fifo":
            raise QueueFull(f"{num_waiting} requests are waiting; retry shortly", "queue_full")
        share = self.queue_share(tenant, weight)
        held = len(self.waiting.get(tenant, ())) + num_before
        # within its share a tenant is always queued; the hard cap only guards against weights changing
        if held < share and num_waiting < 2 * limit:
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
                if request.request_id == request_id and self._preempted.get(request.row) is request:
                    request.finish("abort")  # _on_finish takes it out of the queue and gives its row back
                    return request
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
    def schedule(self) -> StepInput:
        """Retire the requests that finished, admit who fits. Touches only the rows that leave or join."""
        finished, self._finishing = self._finishing, []
        self.rows.cool_down()
        for request in finished:
            self._leave(_tenant(request), waiting=False)
            self._retire_row(request)
        for request in self._finished_preempted:  # their blocks went when they were preempted
            self.rows.leave(request)
        step = StepInput(prefill=[], decode=[], finished=finished + self._finished_preempted)
        self._finished_preempted = []
        if self.blocks is not None:
            self._grow(step)
        self._min_active_counter()
        starved = self._make_room_for_starved(step) if self.config.preempt_for_share else None
        step.decode = self.running.copy()
        budget = self.config.max_prefill_tokens
        if starved is not None:
            budget -= self._admit(starved, step)
        num_free = self.config.max_num_seqs - self._num_running_slots
        while self._num_waiting and num_free > 0:
            tenant = self._next_tenant()
            head = self.waiting[tenant][0]
            num_tokens = len(head.prompt_token_ids) + self._num_resumed(head)
            if (step.prefill and num_tokens > budget) or head.params.num_beams > num_free:
                break  # a beam group waits (first in line) until its k slots are free
            if head in step.preempted or (self.blocks is not None and not self._can_admit(head)):
                break  # first in line waits for blocks to free: nobody overtakes it
            if self._forks(head):
                num_choices = self._num_choices(tenant, head, num_free)
                self._admit_choices(tenant, num_choices, step)
                num_free -= num_choices
                budget -= num_tokens
                continue
            num_free -= head.params.num_beams
            budget -= self._admit(tenant, step)
        # waiting requests that were aborted never held a slot: report them as finished, nothing to free
        step.finished += self._aborted_waiting
        self._aborted_waiting = []
        for request in step.finished:
            request.status = RequestStatus.FINISHED
            self._order.pop(id(request), None)
        return step

    def _admit(self, tenant: str, step: StepInput) -> int:
        """The head of `tenant`'s line joins the batch (a preempted one resumes); returns its prefill tokens."""
        head = self.waiting[tenant][0]
        num_tokens = len(head.prompt_token_ids) + self._num_resumed(head)
        need = self._block_need(head) if self.blocks is not None else None
        request = self._pop(tenant)
        request.status = RequestStatus.RUNNING
        self._charge(request, self.config.prefill_token_cost * num_tokens)
        if self._preempted.pop(request.row, None) is request:
            step.resumed[request.row] = self.rows.token_ids(request.row)
            self._place_running(request)
        else:
            self._join_row(request)
        if need is not None:
            step.blocks[request.row] = self._admit_blocks(request, need)
        step.prefill.append(request)
        return num_tokens

    # -- fair share of the rows: a tenant with nothing running does not wait for a turnover ------------
    def _make_room_for_starved(self, step: StepInput) -> str | None:
        """When every row is taken and a waiting tenant has none though its weighted share is at least one, the
        tenant furthest over its share (VTC) loses its latest request, preempted as when blocks run out; returns
        the starved tenant (its head joins at once), or None."""
        if not self._num_waiting or self._num_running_slots < self.config.max_num_seqs:
            return None
        total = sum(self.weights.get(t, 1.0) for t in self.load)
        rows = self.config.max_num_seqs / max(total, 1e-9)  # rows per unit of weight
        starved = [
            t
            for t, queue in self.waiting.items()
            if self.load[t].num_running == 0
            and rows * self.weights.get(t, 1.0) >= 1
            and queue[0].params.num_beams == 1
            and queue[0] not in step.preempted
            and (self.blocks is None or self._can_admit(queue[0]))
        ]
        if not starved:
            return None
        tenant = min(starved, key=lambda t: (self.counters[t], self._order[id(self.waiting[t][0])]))
        # over its share of the rows, and served at least as much as the starved tenant (VTC's order holds)
        over = [
            r
            for r in self.running
            if r.params.num_beams == 1
            and not self.rows.is_done[r.row]
            and self.load[_tenant(r)].num_running > rows * self.weights.get(_tenant(r), 1.0)
            and self.counters[_tenant(r)] >= self.counters[tenant]
        ]
        if not over:
            return None
        top = max(self.counters[_tenant(r)] for r in over)
        victim = max((r for r in over if self.counters[_tenant(r)] == top), key=lambda r: self._order[id(r)])
        self._preempt(victim, step)
        self.num_share_preemptions += 1
        return tenant

    # -- paged: blocks as rows grow, preemption when none is left ---------------------------------------
    def _num_resumed(self, request: Request) -> int:
        """Tokens a preempted request generated before: its prefill runs them again after its prompt."""
        return int(self.rows.num_output[request.row]) if self._preempted.get(request.row) is request else 0

    def _block_need(self, request: Request, num_choices: int = 1) -> tuple[str | None, int, int, int, int]:
        """(prefix key, P, own tokens, sequences, shared tokens) an admission takes from the pool: a beam group
        every block it may use (prompts shared); any other request its prompt (and what it generated before
        a preemption) and the position it writes next — later blocks come as it grows; `num_choices` choices
        of one request admitted together, each that, their prompt shared."""
        assert self.blocks is not None
        num_prompt = self.blocks.num_own_prompt(len(request.prompt_token_ids))
        if num_choices > 1:
            return request.prefix_key, request.num_prefix_tokens, num_prompt + 1, num_choices, num_prompt
        if request.params.num_beams > 1:
            own = num_prompt + request.params.max_new_tokens
            return request.prefix_key, request.num_prefix_tokens, own, request.params.num_beams, num_prompt
        own = num_prompt + self._num_resumed(request) + 1
        return request.prefix_key, request.num_prefix_tokens, own, 1, 0

    def _can_admit(self, request: Request, num_choices: int = 1) -> bool:
        """Blocks for the request, and (while others run) a reserve of 2 % of the pool for them to grow into:
        admitting up to the last block would preempt at the next block boundary."""
        assert self.blocks is not None
        key, num_prefix, own, num_seqs, shared = self._block_need(request, num_choices)
        reserve = max(1, self.blocks.num_usable // 50) if self.running else 0
        return self.blocks.can_admit(key, num_prefix, own, num_seqs, shared, reserve)

    def _admit_blocks(self, request: Request, need: tuple[str | None, int, int, int, int]) -> list[SeqBlocks]:
        """The pool's grant for `need` (_block_need, taken before a resuming request left the queue)."""
        assert self.blocks is not None
        grants = self.blocks.admit(request.row, *need)
        self._track_blocks(request, need[2])
        return grants

    def _track_blocks(self, request: Request, num_tokens: int) -> None:
        """A joining row's blocks as _grow reads them: `num_tokens` own positions granted."""
        assert self.blocks is not None
        row = request.row
        self._is_growing[row] = request.params.num_beams == 1
        self._num_own_blocks[row] = self.blocks.blocks_for(num_tokens)
        self._num_prompt[row] = self.blocks.num_own_prompt(len(request.prompt_token_ids))

    def _forks(self, head: Request) -> bool:
        """Paged: the head is the first of choices of one request queued together (not a resuming one; BART's
        choices run alone: its runner does not fork an encoded source)."""
        return (
            self.blocks is not None
            and not self.blocks.is_encoder_decoder
            and head.group is not None
            and head.params.num_beams == 1
            and self._preempted.get(head.row) is not head
        )

    def _num_choices(self, tenant: str, head: Request, num_free: int) -> int:
        """How many choices of head's request, queued behind it, join with it (head included): as many as rows
        and blocks allow (head alone fits). A preempted choice is never among them: preemptions wait in front."""
        queue = self.waiting[tenant]
        num = 1
        while num < min(len(queue), num_free) and queue[num].group == head.group:
            num += 1
        while num > 1 and not self._can_admit(head, num):
            num -= 1
        return num

    def _admit_choices(self, tenant: str, num: int, step: StepInput) -> None:
        """`num` choices of one request from the front of the tenant's line, admitted together: the first runs
        the prompt (charged once), the others fork from it (`step.forks`) and share the prompt's whole blocks."""
        assert self.blocks is not None
        choices = [self._pop(tenant) for _ in range(num)]
        first = choices[0]
        key, num_prefix, own, _, num_shared = self._block_need(first, num)
        self._charge(first, self.config.prefill_token_cost * len(first.prompt_token_ids))
        for request in choices:
            request.status = RequestStatus.RUNNING
            self._join_row(request)
        grants = self.blocks.admit_choices([r.row for r in choices], key, num_prefix, own, num_shared)
        for request, grant in zip(choices, grants, strict=True):
            step.blocks[request.row] = [grant]
            self._track_blocks(request, own)
            if request is not first:
                step.forks[request.row] = first.row
        step.prefill += choices

    def _grow(self, step: StepInput) -> None:
        """Each running row about to write into a new block gets one; when the pool has none left, running
        requests are preempted (the tenant furthest over its share first, its latest request) until it does —
        or the row itself was preempted. Array tests find the rows; only those are visited."""
        assert self.blocks is not None
        rows = self.rows
        # the next decode writes own entry prompt + num_output - 1 (+ num_ahead: a step in flight not recorded
        # yet): blocks for prompt + num_output + num_ahead entries
        ahead = self._num_prompt + rows.num_output + self.config.num_ahead
        need = -(-ahead // self.blocks.block_size)
        short = np.flatnonzero(self._is_growing & ~rows.is_done & (need > self._num_own_blocks))
        for row in sorted(short.tolist(), key=lambda r: self._order[id(rows.requests[r])]):
            while self._is_growing[row] and not self.blocks.can_grow(1):
                self._preempt(self._victim(), step)
                self.num_preemptions += 1
            if self._is_growing[row]:
                step.grown[row] = self.blocks.grow(row, 1)
                self._num_own_blocks[row] += 1

    def _victim(self) -> Request:
        """The running request to preempt: of the tenant with the most service (VTC), its latest."""
        candidates = [r for r in self.running if self._is_growing[r.row] and not self.rows.is_done[r.row]]
        top = max(self.counters[_tenant(r)] for r in candidates)
        return max(
            (r for r in candidates if self.counters[_tenant(r)] == top), key=lambda r: self._order[id(r)]
        )

    def _preempt(self, request: Request, step: StepInput) -> None:
        """Free a running request's slot (and blocks) and queue it first in its tenant's line, keeping its row (its
        tokens so far): when it is admitted again its prefill runs prompt + those tokens, and it goes on where it
        was."""
        row, tenant = request.row, _tenant(request)
        self._unplace_running(request)
        if self.blocks is not None:
            self.blocks.release(row)  # a block it grew this step included: the runner is not told of it
            step.grown.pop(row, None)
            self._is_growing[row] = False
            self._num_own_blocks[row] = 0
        self._num_running_slots -= 1
        load = self.load[tenant]
        load.num_running -= 1
        load.num_waiting += 1
        request.status = RequestStatus.WAITING
        self.waiting.setdefault(tenant, deque()).appendleft(request)
        self._num_waiting += 1
        self._preempted[row] = request
        step.preempted.append(request)

    def _finish_preempted(self, request: Request) -> None:
        """A preempted request finished while it waited (aborted, a stop string in the front)."""
        tenant = _tenant(request)
        queue = self.waiting[tenant]
        queue.remove(request)
        if not queue:
            del self.waiting[tenant]
        self._num_waiting -= 1
        self._leave(tenant, waiting=True)
        del self._preempted[request.row]
        request.output_token_ids = self.rows.token_ids(request.row)
        self._finished_preempted.append(request)

    def _join_row(self, request: Request) -> None:
        self.rows.join(request)
        if self._is_growing.size < self.rows.capacity:  # the rows grew (preempted requests keep theirs)
            rows = self.rows.capacity
            self._is_growing = _padded(self._is_growing, rows)
            self._num_own_blocks = _padded(self._num_own_blocks, rows)
            self._num_prompt = _padded(self._num_prompt, rows)
        request.on_finish = self._on_finish
        self._place_running(request)

    def _place_running(self, request: Request) -> None:
        self._place[id(request)] = len(self.running)
        self.running.append(request)
        self._num_running_slots += request.params.num_beams
        self.num_beam_groups += request.params.num_beams > 1

    def _unplace_running(self, request: Request) -> None:
        """Out of the running list: the last one moves into its place."""
        place = self._place.pop(id(request))
        last = self.running.pop()
        if last is not request:
            self.running[place] = last
            self._place[id(last)] = place

    def _retire_row(self, request: Request) -> None:
        """Take a finished request out of the running list and its row."""
        self._unplace_running(request)
        if self.blocks is not None:
            self.blocks.release(request.row)
            self._is_growing[request.row] = False
        self.rows.leave(request)
        self._num_running_slots -= request.params.num_beams
        self.num_beam_groups -= request.params.num_beams > 1

    def _on_finish(self, request: Request) -> None:
        """A running request finished (here, in the front, anywhere): it leaves at the next schedule(), and
        its generated tokens become its output_token_ids (a beam group's are set by _update_beams)."""
        if request.status is RequestStatus.WAITING and self._preempted.get(request.row) is request:
            self._finish_preempted(request)
            return
        if request.status is not RequestStatus.RUNNING or self.rows.requests[request.row] is not request:
            return
        self.rows.is_done[request.row] = True
        if not self.rows.is_beam[request.row]:
            request.output_token_ids = self.rows.token_ids(request.row)
        self._finishing.append(request)

    def _next_tenant(self) -> str:
        """Fair: the backlogged tenant with the least service (ties: earliest request). FIFO: earliest request."""

        def arrival(tenant: str) -> int:
            return self._order[id(self.waiting[tenant][0])]

        if self.config.policy == "fifo":
            return min(self.waiting, key=arrival)
        # a linear scan over backlogged tenants: fine for hundreds; a heap is the next step for thousands.
        # Ties (a returning tenant is lifted to the smallest counter) go to the tenant running fewer requests.
        return min(self.waiting, key=lambda t: (self.counters[t], self.load[t].num_running, arrival(t)))

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

    def update(self, batch: StepInput, out: StepOutput) -> Progress:
        """Record the step's tokens by row: append, finish on EOS, a stop token id or length, charge their
        tenants — array operations over the rows; only rows that fail, finish or run a beam group are visited
        one by one. A row that finished while the step ran (aborted, stopped) or has left since (the engine
        overlapping steps) drops its token."""
        rows, tokens = out.rows, out.token_ids
        running = self.rows
        progress = Progress()
        before = len(self._finishing)
        # overlapped steps: a row preempted after this step was sent may finish on its token (EOS, length, a
        # failure) while it waits; it is reported here like the running rows that finish
        before_preempted = len(self._finished_preempted)
        for row in out.failed:
            if running.requests[row] is not None:  # else it left while the step ran (overlapped steps)
                running.requests[row].finish("error")  # type: ignore[union-attr]
        for row, result in out.beams.items():
            request = running.requests[row]
            if request is not None and not request.is_finished:
                self._update_beams(request, result)
        if rows.size:
            alive = ~running.is_done[rows]
            if not alive.all():
                rows, tokens = rows[alive], tokens[alive]
            self._charge_rows(rows)
            is_eos = np.isin(tokens, self._eos) & ~running.ignore_eos[rows]
            if is_eos.any():
                for row in rows[is_eos].tolist():
                    self._row_request(row).finish("stop")
                rows, tokens = rows[~is_eos], tokens[~is_eos]
            num_output = running.num_output[rows]
            running.tokens[rows, num_output] = tokens
            num_output += 1
            running.num_output[rows] = num_output
            is_stop = self._stop_token_hits(rows, tokens)
            for row in rows[is_stop].tolist():  # a stop token id is kept in the output, unlike EOS
                self._row_request(row).finish("stop")
            for row in rows[(num_output >= running.max_new[rows]) & ~is_stop].tolist():
                self._row_request(row).finish("length")
            progress.rows, progress.token_ids, progress.num_output = rows, tokens, num_output
        progress.finished = self._finishing[before:] + self._finished_preempted[before_preempted:]
        return progress

    def _stop_token_hits(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """[rows] bool: the row sampled one of its stop_token_ids (only rows that have some are compared)."""
        is_stop = np.zeros(rows.size, dtype=bool)
        has_ids = self.rows.has_stop_ids[rows]
        if has_ids.any():
            is_stop[has_ids] = (self.rows.stop_ids[rows[has_ids]] == tokens[has_ids, None]).any(axis=1)
        return is_stop

    def _row_request(self, row: int) -> Request:
        request = self.rows.requests[row]
        assert request is not None, f"row {row} is not running"
        return request

    def _charge_rows(self, rows: np.ndarray) -> None:
        """Charge a generated token to each row's tenant: one count per tenant, not one add per row."""
        counts = np.bincount(self.rows.tenant[rows], minlength=len(self.rows.tenants))
        for index in np.flatnonzero(counts).tolist():
            tenant = self.rows.tenants[index]
            weight = max(self.weights.get(tenant, 1.0), 1e-9)
            self.counters[tenant] += self.config.output_token_cost * int(counts[index]) / weight

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
