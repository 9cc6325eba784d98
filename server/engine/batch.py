"""The runner's persistent batch: every slot's state in preallocated arrays, changed only when rows join or leave.

Slot i holds one sequence (a beam group holds k slots, one per beam); slots [0, num_slots) are in use, so a
decode step reads every array as a slice — no loop over rows to build its inputs or its sampling parameters.
When a slot is freed the last slot's entries move into it (`remove`), the same compaction the KV cache does
(runner.py). `rows` says which scheduler row each slot serves: the runner answers by row (step.py).
"""

from __future__ import annotations

import numpy as np

from server.engine.request import Request
from server.engine.sampler import RowView
from server.engine.step import put_ids

# the per-slot arrays, by name and dtype
_FIELDS = {
    "rows": np.int64,  # the scheduler's row of the request
    "last_token": np.int64,  # the token fed at the next decode step
    "seq_len": np.int64,  # entries written in the self-attention cache (= position of the next fed token)
    "cross_len": np.int64,  # BART: cross prefix + source entries
    "beam": np.int64,  # which beam of its request's beam group (0 without beam search)
    "num_output": np.int64,  # tokens sampled so far (the sampler's step; forced tokens' positions)
    "prompt_len": np.int64,
    "max_new": np.int64,
    "ignore_eos": bool,
    "temperature": np.float32,
    "top_k": np.int64,
    "top_p": np.float32,
    "key": np.uint64,  # seed_key of the request's seed
    "has_penalties": bool,
    "logprobs": np.int64,  # alternatives asked for; -1: no logprobs
    "min_tokens": np.int64,  # vLLM's: EOS and stop token ids masked before this many tokens
    "is_beam": bool,
}


class InputBatch:
    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.requests: list[Request] = []  # slot -> request
        self.num_special = 0  # slots with penalties, logprobs or beams (the sampler visits those one by one)
        for name, dtype in _FIELDS.items():
            setattr(self, name, np.zeros(max_slots, dtype=dtype))
        self.rows: np.ndarray
        self.last_token: np.ndarray
        self.seq_len: np.ndarray
        self.cross_len: np.ndarray
        self.beam: np.ndarray
        self.num_output: np.ndarray
        self.prompt_len: np.ndarray
        self.max_new: np.ndarray
        self.ignore_eos: np.ndarray
        self.temperature: np.ndarray
        self.top_k: np.ndarray
        self.top_p: np.ndarray
        self.key: np.ndarray
        self.has_penalties: np.ndarray
        self.logprobs: np.ndarray
        self.min_tokens: np.ndarray
        self.is_beam: np.ndarray
        # stop_token_ids by slot, -1 padded (widened as needed); read only for slots short of min_tokens
        self.stop_ids = np.full((max_slots, 1), -1, dtype=np.int64)

    @property
    def num_slots(self) -> int:
        return len(self.requests)

    def append(
        self, request: Request, key: int, seq_len: int, cross_len: int, last_token: int, beam: int = 0
    ) -> int:
        """A new slot for `request` (at the end); returns it."""
        slot = len(self.requests)
        params = request.params
        self.requests.append(request)
        values = {
            "rows": request.row,
            "last_token": last_token,
            "seq_len": seq_len,
            "cross_len": cross_len,
            "beam": beam,
            "num_output": 0,
            "prompt_len": len(request.prompt_token_ids),
            "max_new": params.max_new_tokens,
            "ignore_eos": params.ignore_eos,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "key": key,
            "has_penalties": params.has_penalties,
            "logprobs": -1 if params.logprobs is None else params.logprobs,
            "min_tokens": params.min_tokens,
            "is_beam": params.num_beams > 1,
        }
        for name, value in values.items():
            getattr(self, name)[slot] = value
        if params.min_tokens:
            self.stop_ids = put_ids(self.stop_ids, slot, params.stop_token_ids)
        self.num_special += self._is_special(slot)
        return slot

    def remove(self, slot: int) -> None:
        """Free `slot`: the last slot's entries move into it."""
        self.num_special -= self._is_special(slot)
        last = len(self.requests) - 1
        if slot != last:
            for name in _FIELDS:
                array = getattr(self, name)
                array[slot] = array[last]
            self.stop_ids[slot] = self.stop_ids[last]
            self.requests[slot] = self.requests[last]
        self.requests.pop()

    def slots_of(self, row: int) -> list[int]:
        """The slots serving scheduler row `row`, by beam (one without beam search)."""
        n = len(self.requests)
        slots = np.flatnonzero(self.rows[:n] == row)
        return slots[np.argsort(self.beam[slots], kind="stable")].tolist()

    def _is_special(self, slot: int) -> bool:
        return bool(self.has_penalties[slot] or self.logprobs[slot] >= 0 or self.is_beam[slot])

    def view(self, slots: slice | np.ndarray, forced: dict[int, int]) -> RowView:
        """Some slots as the sampler's RowView: a slice of the arrays (no loop over rows), or chosen slots."""
        requests = self.requests[slots] if isinstance(slots, slice) else [self.requests[i] for i in slots]
        return RowView(
            requests,
            self.temperature[slots],
            self.top_k[slots],
            self.top_p[slots],
            self.key[slots],
            self.num_output[slots],
            self.has_penalties[slots],
            self.logprobs[slots],
            self.min_tokens[slots],
            self.ignore_eos[slots],
            self.stop_ids[slots],
            forced,
        )
