"""The step contract: what the scheduler hands the runner (StepInput) and what comes back (StepOutput).

The same objects cross the runner-process pipe (worker.py): StepOutput as it is, StepInput as a StepMessage
(request ids and, for joining rows, what the child needs to build its mirror). No torch here.

Identity is the scheduler's row: a running request keeps one row (an index into the persistent batch's
arrays, scheduler.py) from the step it joins to the step it leaves. The runner decodes every row it holds
and answers by row: `rows[i]` sampled `token_ids[i]`; a row that failed alone (its own numbers broke) is
in `failed`, a beam group's row in `beams`, and logprobs exist for the rows that asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.engine.block_pool import SeqBlocks
from server.engine.request import Request, SamplingParams


def put_ids(table: np.ndarray, index: int, ids: tuple[int, ...]) -> np.ndarray:
    """Row `index` of an id table [rows, width] (-1 pads) set to `ids`; the table, widened when they do not
    fit (a new array: callers keep the returned one)."""
    if len(ids) > table.shape[1]:
        width = max(len(ids), 2 * table.shape[1])
        table = np.pad(table, ((0, 0), (0, width - table.shape[1])), constant_values=-1)
    table[index] = -1
    table[index, : len(ids)] = ids
    return table


@dataclass(frozen=True)
class BeamResult:
    """A beam group's row in a StepOutput: what it ran this step and, once done, its best hypothesis."""

    num_rows: int  # rows the group ran this step (the tokens it is charged)
    token_ids: list[int] | None = None  # the best hypothesis once the search is done (its EOS included)


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id, logprob), most likely first; only
    tokens the distribution can draw (finite log-probability) are listed."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepInput:
    """One engine step: free `finished` (leaving rows), prefill `prefill` (joining rows), decode `decode`
    (the rows that ran before, in the scheduler's order). With the paged KV layout, `blocks` gives each
    joining row its block tables (one per beam), as the scheduler's block pool granted them, and the fields
    below say who was preempted, who grew, who resumes."""

    prefill: list[Request]
    decode: list[Request]
    finished: list[Request]
    blocks: dict[int, list[SeqBlocks]] = field(default_factory=dict)
    # paged: rows preempted this step (their slots go, their sampler state stays), rows given one more block
    # for the position they write next (block ids to append to their tables), and joining rows that resume
    # after a preemption (the tokens they generated before: their prefill runs prompt + these)
    preempted: list[Request] = field(default_factory=list)
    grown: dict[int, list[int]] = field(default_factory=dict)
    resumed: dict[int, list[int]] = field(default_factory=dict)
    # paged: joining choices of one request that run no prefill of their own, by row -> the row whose prefill
    # they share (its last logits give their first token; the block where its prompt ends is copied into theirs)
    forks: dict[int, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode or self.finished)

    @property
    def sequences(self) -> list[Request]:
        """Requests that get a token (or a beam step) this step."""
        return self.prefill + self.decode if self.prefill else self.decode


def _empty_rows() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class StepOutput:
    """The runner's answer to one StepInput, by row (see the module docstring)."""

    rows: np.ndarray = field(default_factory=_empty_rows)  # [m] int64: rows that sampled a token
    token_ids: np.ndarray = field(default_factory=_empty_rows)  # [m] int64: their tokens
    failed: list[int] = field(default_factory=list)  # rows whose own numbers broke: they alone fail
    beams: dict[int, BeamResult] = field(default_factory=dict)  # beam groups' rows
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # rows that asked
    forward_seconds: float = 0.0  # time in the backbone's forward calls this step
    cpu_seconds: float = 0.0  # the runner process's CPU time this step (0 in one process)

    @classmethod
    def of(cls, requests: list[Request], tokens: list[int | BeamResult | None]) -> StepOutput:
        """From one entry per request: a token id, a BeamResult, or None for a failed row (tests)."""
        pairs = [(r.row, t) for r, t in zip(requests, tokens, strict=True) if isinstance(t, int)]
        return cls(
            np.array([row for row, _ in pairs], dtype=np.int64),
            np.array([t for _, t in pairs], dtype=np.int64),
            failed=[r.row for r, t in zip(requests, tokens, strict=True) if t is None],
            beams={r.row: t for r, t in zip(requests, tokens, strict=True) if isinstance(t, BeamResult)},
        )

    def tokens(self, requests: list[Request]) -> list[int | BeamResult | None]:
        """One entry per request (tests and slow paths): its token, its BeamResult, or None (failed)."""
        by_row = dict(zip(self.rows.tolist(), self.token_ids.tolist(), strict=True))
        return [self.beams[r.row] if r.row in self.beams else by_row.get(r.row) for r in requests]


@dataclass(frozen=True)
class WireTensor:
    """A tensor on the pipe to the runner's process as plain bytes (no shared-memory handles, every dtype)."""

    data: bytes
    dtype: str  # torch's name for it, without "torch."
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WirePrefix:
    """A joining row's prefix: the key the child keeps its copy by, and its tensors the first time it is sent."""

    key: int
    tensors: dict[str, WireTensor] | None = None


@dataclass(frozen=True)
class JoiningRow:
    """What the runner's process needs of a joining request."""

    row: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefix: WirePrefix | None = None  # None: the bare backbone
    resumed: tuple[int, ...] = ()  # resuming after a preemption: the tokens it generated before
    # paged: its tables as the front's pool granted them (one per beam; fresh blocks are zeroed, a new prefix's
    # written), and the row whose prefill it shares when it is a forking choice
    blocks: tuple[SeqBlocks, ...] = ()
    fork: int | None = None


@dataclass(frozen=True)
class StepMessage:
    """A StepInput on the pipe to the runner's process: rows that leave, are preempted (their sampler state
    stays for when they rejoin) and join (the child decodes every row it holds); `forgotten`: prefix keys the
    child may drop; `grown` (paged): the block each row crossing into one appends to its table (a steady step
    carries only those rows). The child runs the messages in order, so a block the front freed and handed on
    in this step is written by its new owner only after every earlier step that read it."""

    leaving: list[int]
    joining: list[JoiningRow]
    forgotten: list[int]
    preempted: list[int] = field(default_factory=list)
    grown: dict[int, list[int]] = field(default_factory=dict)
