"""The paged KV memory's bookkeeping (`--kv-layout paged`): fixed-size blocks, a free list, a block table per
sequence, and every resident prefix stored once as shared read-only blocks. Pure Python, no torch: the scheduler
admits by it, and the runner's PagedKVCache (paged_cache.py) holds the tensors these block ids index.

- Block 0 is never handed out: it stays zero and pads every block table, so a table's unused entries read
  finite zeros, masked.
- A sequence's table is `[its prefix's blocks | its own blocks]`. Its own tokens start in a fresh block after
  the prefix's, so a prefix block is written once, when the prefix is loaded, and never again.
- A prefix's blocks belong to the pool's entry for it, keyed by its content (a replaced prefix has a new key,
  so the old version is never served), referenced by every running sequence that uses it. An entry nobody
  references stays resident for the next request, and is evicted (least recently used first) when blocks run
  short; a referenced one never is.
- A sequence's own blocks are taken as it needs them (`grow`, one when it crosses into a new block); when none
  is left the scheduler preempts a running sequence (scheduler.py). A beam group reserves every block it may
  use at admission and is never preempted.
- A beam group's beams share their prompt: its whole blocks are the first beam's, read by every beam; each other
  beam owns only the block where the prompt ends (copied when the group forks) and the blocks after it.
- The choices of one request (`n` > 1) admitted together (`admit_choices`) share their prompt's whole blocks,
  counted by the choices that hold them and freed with the last; each choice owns the block where the prompt
  ends (the first choice's is written by the prefill, the others' are copies) and the blocks after it.
- Encoder-decoder (BART): a prefix's blocks are `[its decoder entries | its cross entries]`, each part from a
  block's start, and a sequence's own blocks `[its source's cross entries | its decoder's]`: the cross part is
  taken whole at admission (fixed once encoded), the decoder part grows. `prefix_tokens` and `num_own_prompt`
  say what a prefix and a prompt take, so admission, growth and beams count both parts with the same arithmetic.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqBlocks:
    """One sequence's blocks, as the runner needs them when it joins (a beam group has one per beam)."""

    table: list[int]  # the prefix's blocks, then the sequence's own
    num_prefix_blocks: int
    num_prefix_tokens: int  # P: real tokens' positions start here
    is_prefix_new: bool  # the prefix's blocks were just taken: the runner writes the prefix into them
    fresh: list[int]  # blocks new to this step (own, and the prefix's when new): zeroed before use


@dataclass
class _Prefix:
    blocks: list[int]
    num_refs: int = 0


@dataclass
class _Shared:
    """Whole prompt blocks the choices of one request read (never written after their prefill)."""

    blocks: list[int]
    num_refs: int


@dataclass
class _Sequence:
    prefix_key: str | None
    own: list[list[int]] = field(default_factory=list)  # per beam
    shared: _Shared | None = None  # a choice's prompt blocks, shared with its request's other choices


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, is_encoder_decoder: bool = False):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(
                "a block pool needs at least 2 blocks (block 0 is the zero block) of >= 1 position"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.is_encoder_decoder = is_encoder_decoder
        self._free = list(range(num_blocks - 1, 0, -1))  # popped from the end: low ids first
        self._prefixes: dict[str, _Prefix] = {}
        # the resident prefixes no sequence references, least recently used first (evicted in that order), and
        # their blocks and every resident prefix's, counted as they change: an admission does not scan them all
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._num_idle_blocks = 0
        self._num_prefix_blocks = 0
        self._sequences: dict[int, _Sequence] = {}  # by scheduler row
        self.num_evictions = 0
        # admissions that wrote their prefix into new blocks (a host-to-device copy), and those whose prefix was
        # resident (its blocks referenced, nothing copied)
        self.num_prefix_loads = 0
        self.num_prefix_hits = 0

    # -- accounting (read by metrics and the start-up line) --------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_prefix_blocks(self) -> int:
        """Blocks held by resident prefixes, referenced or not (each stored once)."""
        return self._num_prefix_blocks

    @property
    def num_sequence_blocks(self) -> int:
        return self.num_usable - self.num_free - self.num_prefix_blocks

    @property
    def num_resident_prefixes(self) -> int:
        return len(self._prefixes)

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks of resident prefixes no running sequence references: taken (LRU) when the free ones run out."""
        return self._num_evictable(None)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_tokens(self, num_decoder: int, num_cross: int) -> int:
        """A prefix's entries as admission counts them (its `num_prefix_tokens`): decoder-only its P; encoder-decoder
        its decoder entries padded to whole blocks, then its cross entries (a part it lacks takes none)."""
        if not self.is_encoder_decoder:
            return num_decoder
        return self.blocks_for(num_decoder) * self.block_size + num_cross

    def num_own_prompt(self, num_prompt: int) -> int:
        """A sequence's own entries its prompt takes. Encoder-decoder: the source's cross entries in whole blocks,
        then the decoder's start token (the tokens it generates follow, as a decoder-only prompt's do)."""
        if not self.is_encoder_decoder:
            return num_prompt
        return self.blocks_for(num_prompt) * self.block_size + 1

    # -- admission ----------------------------------------------------------------------------------------
    def num_needed(
        self,
        prefix_key: str | None,
        num_prefix_tokens: int,
        num_tokens: int,
        num_seqs: int = 1,
        num_shared: int = 0,
    ) -> int:
        """Blocks an admission takes now: each sequence's own, plus the prefix's unless it is resident."""
        own = self._num_own(num_tokens, num_seqs, num_shared)
        if prefix_key is None or prefix_key in self._prefixes:
            return own
        return own + self.blocks_for(num_prefix_tokens)

    def can_ever_fit(
        self, num_prefix_tokens: int, num_tokens: int, num_seqs: int = 1, num_shared: int = 0
    ) -> bool:
        """Whether the admission fits the whole pool (nothing else running): else it is refused at the door."""
        need = self.blocks_for(num_prefix_tokens) + self._num_own(num_tokens, num_seqs, num_shared)
        return need <= self.num_usable

    def can_admit(
        self,
        prefix_key: str | None,
        num_prefix_tokens: int,
        num_tokens: int,
        num_seqs: int = 1,
        num_shared: int = 0,
        reserve: int = 0,
    ) -> bool:
        """Whether the admission's blocks, and `reserve` more, are free or evictable now."""
        available = self.num_free + self._num_evictable(keep=prefix_key)
        need = self.num_needed(prefix_key, num_prefix_tokens, num_tokens, num_seqs, num_shared)
        return need + reserve <= available

    def admit(
        self,
        row: int,
        prefix_key: str | None,
        num_prefix_tokens: int,
        num_tokens: int,
        num_seqs: int = 1,
        num_shared: int = 0,
    ) -> list[SeqBlocks]:
        """Blocks for `num_seqs` sequences of `num_tokens` own tokens each behind one prefix (referenced, loaded
        into new blocks unless resident); the first `num_shared` tokens are the same in every sequence (a beam
        group's prompt): their whole blocks are the first sequence's, referenced by the others, so only the
        block where they part is each sequence's own. Call can_admit first: raises MemoryError otherwise."""
        if not self.can_admit(prefix_key, num_prefix_tokens, num_tokens, num_seqs, num_shared):
            raise MemoryError("the block pool cannot hold this admission; check can_admit first")
        prefix_blocks: list[int] = []
        is_new = False
        if prefix_key is None:
            num_prefix_tokens = 0
        else:
            entry = self._prefixes.get(prefix_key)
            if entry is None:
                is_new = True
                entry = self._prefixes[prefix_key] = _Prefix(
                    self._take(self.blocks_for(num_prefix_tokens), prefix_key)
                )
                self._num_prefix_blocks += len(entry.blocks)
            self._reference(prefix_key)
            self.num_prefix_loads += is_new
            self.num_prefix_hits += not is_new
            prefix_blocks = entry.blocks
        sequence = self._sequences[row] = _Sequence(prefix_key)
        first = self._take(self.blocks_for(num_tokens), prefix_key)
        sequence.own.append(first)
        fresh = (prefix_blocks if is_new else []) + first
        grants = [SeqBlocks(prefix_blocks + first, len(prefix_blocks), num_prefix_tokens, is_new, fresh)]
        shared = first[: num_shared // self.block_size]
        for _ in range(num_seqs - 1):
            own = self._take(len(first) - len(shared), prefix_key)
            sequence.own.append(own)
            grants.append(
                SeqBlocks(prefix_blocks + shared + own, len(prefix_blocks), num_prefix_tokens, False, own)
            )
        return grants

    def admit_choices(
        self,
        rows: list[int],
        prefix_key: str | None,
        num_prefix_tokens: int,
        num_tokens: int,
        num_shared: int,
    ) -> list[SeqBlocks]:
        """Blocks for the choices of one request, one row each, admitted together: `num_tokens` own tokens
        each, the first `num_shared` (the prompt) the same in all. The prompt's whole blocks are shared (freed
        with the last choice that holds them); each row owns the rest, the first row's written by the prefill,
        the others' from the block where the prompt ends a copy of it. Call can_admit first (num_seqs =
        len(rows))."""
        grants = self.admit(rows[0], prefix_key, num_prefix_tokens, num_tokens)
        if len(rows) == 1:
            return grants
        num_prefix_blocks = grants[0].num_prefix_blocks
        first = self._sequences[rows[0]]
        blocks = first.own[0]
        shared = _Shared(blocks[: num_shared // self.block_size], len(rows))
        first.own[0], first.shared = blocks[len(shared.blocks) :], shared
        prefix_blocks = grants[0].table[:num_prefix_blocks]
        for row in rows[1:]:
            own = self._take(len(first.own[0]), prefix_key)
            self._sequences[row] = _Sequence(prefix_key, [own], shared)
            if prefix_key is not None:
                self._reference(prefix_key)
            table = prefix_blocks + shared.blocks + own
            grants.append(SeqBlocks(table, num_prefix_blocks, grants[0].num_prefix_tokens, False, own))
        return grants

    def can_grow(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free + self._num_evictable(keep=None)

    def grow(self, row: int, num_blocks: int) -> list[int]:
        """`num_blocks` more own blocks for a running sequence (no beam group); evicts unreferenced prefixes as
        needed. Call can_grow first."""
        blocks = self._take(num_blocks, None)
        self._sequences[row].own[0].extend(blocks)
        return blocks

    def release(self, row: int) -> None:
        """A sequence (group) left: its own blocks are free, its prefix loses a reference (stays resident)."""
        sequence = self._sequences.pop(row, None)
        if sequence is None:
            return
        for own in sequence.own:
            self._free.extend(reversed(own))
        if sequence.shared is not None:
            sequence.shared.num_refs -= 1
            if sequence.shared.num_refs == 0:
                self._free.extend(reversed(sequence.shared.blocks))
        if sequence.prefix_key is not None:
            entry = self._prefixes[sequence.prefix_key]
            entry.num_refs -= 1
            if entry.num_refs == 0:  # evictable from now on, the most recently used of those
                self._idle[sequence.prefix_key] = None
                self._num_idle_blocks += len(entry.blocks)

    def references(self, prefix_key: str) -> int:
        entry = self._prefixes.get(prefix_key)
        return 0 if entry is None else entry.num_refs

    def prefix_blocks(self, prefix_key: str) -> list[int] | None:
        """A resident prefix's blocks (a copy), or None when it is not in the pool."""
        entry = self._prefixes.get(prefix_key)
        return None if entry is None else list(entry.blocks)

    # -- internals ---------------------------------------------------------------------------------------
    def _num_own(self, num_tokens: int, num_seqs: int, num_shared: int) -> int:
        """The first sequence's blocks, and each other's past the whole blocks of the shared tokens."""
        first = self.blocks_for(num_tokens)
        return first + (num_seqs - 1) * (first - num_shared // self.block_size)

    def _reference(self, prefix_key: str) -> None:
        entry = self._prefixes[prefix_key]
        if entry.num_refs == 0 and prefix_key in self._idle:  # referenced again: no longer evictable
            del self._idle[prefix_key]
            self._num_idle_blocks -= len(entry.blocks)
        entry.num_refs += 1

    def _num_evictable(self, keep: str | None) -> int:
        """Blocks of resident prefixes nobody references (but `keep`'s)."""
        if keep is not None and keep in self._idle:
            return self._num_idle_blocks - len(self._prefixes[keep].blocks)
        return self._num_idle_blocks

    def _take(self, num: int, keep: str | None) -> list[int]:
        """`num` free blocks, evicting unreferenced prefixes (least recently used first, never `keep`)."""
        while len(self._free) < num:
            victim = next(k for k in self._idle if k != keep)
            del self._idle[victim]
            blocks = self._prefixes.pop(victim).blocks
            self._num_idle_blocks -= len(blocks)
            self._num_prefix_blocks -= len(blocks)
            self._free.extend(reversed(blocks))
            self.num_evictions += 1
        taken = self._free[len(self._free) - num :][::-1]
        del self._free[len(self._free) - num :]
        return taken
