"""The slot KV cache every forward pass shares, and how many slots a memory budget holds.

Sizing follows nano-vllm: measure what is left on the device after the model is loaded, take a share of
it, and hand out as many whole-sequence slots as fit. A slot holds one sequence at full length, so a
budget that cannot hold one is refused rather than discovered by an out-of-memory error mid-request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefix_store.format import BackboneShape
from server.engine.decoder_inputs import Attention, PrefillInputs, decode_attention, prepare_prefill
from server.engine.transfer import copy_to_device

log = logging.getLogger("prefixserve.engine")

# Share of the memory left after loading the model (and reserving the prefix cache) that the KV cache
# takes by default. The rest covers activations, the tokenizers, the request queue and the allocator.
DEFAULT_KV_SHARE = 0.8


class KVBudgetError(ValueError):
    """The KV budget cannot hold one full-length sequence; the message says what to change."""


class KVCache:
    """Per-slot KV storage. Slot s holds `[prefix (P) | tokens]`; cache index == the token's position.

    self_kv:  [num_layers, 2, num_slots, num_kv_heads, max_positions, head_dim]
    cross_kv: [num_layers, 2, num_slots, num_kv_heads, max_prefix + max_source, head_dim] (BART only)
    Zero-initialised: masked-out entries are read by the attention matmul (with weight 0), so they must
    never hold NaN/Inf. A request whose numbers broke may have written NaN/Inf into its own slot: the
    runner clears a slot's written entries when its sequence leaves, so the next occupant reads zeros.
    """

    def __init__(
        self, shape: BackboneShape, num_slots: int, max_positions: int, cross_len: int, device, dtype
    ):
        dims = (shape.num_layers, 2, num_slots, shape.kv_heads)
        self.self_kv = torch.zeros(*dims, max_positions, shape.head_dim, device=device, dtype=dtype)
        self.cross_kv = (
            torch.zeros(*dims, cross_len, shape.head_dim, device=device, dtype=dtype) if cross_len else None
        )

    @staticmethod
    def bytes_per_slot(shape: BackboneShape, max_positions: int, cross_len: int, dtype: torch.dtype) -> int:
        """Bytes one slot takes: self-attention entries for every position, plus the cross entries."""
        per_position = shape.num_layers * 2 * shape.kv_heads * shape.head_dim * dtype.itemsize
        return per_position * (max_positions + cross_len)

    @property
    def num_bytes(self) -> int:
        total = self.self_kv.numel() * self.self_kv.element_size()
        if self.cross_kv is not None:
            total += self.cross_kv.numel() * self.cross_kv.element_size()
        return total

    def prefill_inputs(
        self, start: int, token_lists: list[list[int]], prefix_lens: list[int], device: torch.device
    ) -> PrefillInputs:
        """Decoder-only prefill of slots [start, start+n)."""
        return prepare_prefill(start, token_lists, prefix_lens, device)

    def decode_attention(self, positions: torch.Tensor, length: int) -> Attention:
        """Decoder-only decode of slots [0, B)."""
        return decode_attention(positions, length)

    def decode_length(self, seq_len: np.ndarray) -> int:
        """Keys a decode step reads, from the slots' entries written [B]: cache index == position."""
        return int(seq_len.max()) + 1

    def write(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V [N, H, d] into cache entries (rows, cols) [N] of `layer`."""
        rows, cols = where
        kv = self.self_kv[layer]  # [2, S, H, T, d]
        # integer indices of known length (not a boolean mask): no device -> host wait for the count
        kv[0][rows, :, cols] = k
        kv[1][rows, :, cols] = v

    def read(self, layer: int, what: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [n, H, length, d] of slots `what[0]`, entries [0, what[1]): views, no copy."""
        slots, length = what
        kv = self.self_kv[layer]
        return kv[0, slots, :, :length], kv[1, slots, :, :length]

    def attend(
        self, layer: int, q: torch.Tensor, attention: Attention, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """SDPA of q [n, H, T, d] over the keys `attention.read` names, visible per `mask`."""
        keys, values = self.read(layer, attention.read)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    # -- BART's cross entries: written by the encoder, read by every decoder layer ---------------------------
    def cross_where(self, rows: np.ndarray, cols: np.ndarray, device: torch.device) -> tuple:
        """Where the cross K/V of slots `rows` at cross entries `cols` [N] go (write_cross's index)."""
        return tuple(copy_to_device([torch.from_numpy(rows), torch.from_numpy(cols)], device))

    def write_cross(self, layer: int, where: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Cross K/V [N, H, d] into cross entries `where` (cross_where) of `layer`."""
        assert self.cross_kv is not None
        rows, cols = where
        kv = self.cross_kv[layer]  # [2, S, H, C, d]
        kv[0][rows, :, cols] = k
        kv[1][rows, :, cols] = v

    def cross_attention(self, start: int, cross_lens: torch.Tensor, cross_length: int) -> Attention:
        """Slots [start, start+n) read their first `cross_lens` [n] (device) cross entries, at most cross_length."""
        n = cross_lens.shape[0]
        mask = (torch.arange(cross_length, device=cross_lens.device)[None, :] < cross_lens[:, None])[
            :, None, None, :
        ]
        rows = torch.arange(n, device=cross_lens.device)
        return Attention(None, rows, (slice(start, start + n), cross_length), mask)

    def attend_cross(self, layer: int, q: torch.Tensor, attention: Attention, scale: float) -> torch.Tensor:
        """SDPA of q [n, H, T, d] over the slots' cross entries (cross_attention)."""
        assert self.cross_kv is not None
        slots, length = attention.read
        kv = self.cross_kv[layer]
        return F.scaled_dot_product_attention(
            q, kv[0, slots, :, :length], kv[1, slots, :, :length], attn_mask=attention.mask, scale=scale
        )

    def clear(self, slot: int, self_len: int, cross_len: int) -> None:
        """Zero a slot's first entries (what its sequence wrote)."""
        self.self_kv[:, :, slot, :, :self_len] = 0
        if self.cross_kv is not None:
            self.cross_kv[:, :, slot, :, :cross_len] = 0

    def move(self, src: int, dst: int, self_len: int, cross_len: int) -> None:
        """Copy slot src's live entries into slot dst (compaction after a sequence leaves)."""
        self.self_kv[:, :, dst, :, :self_len] = self.self_kv[:, :, src, :, :self_len]
        if self.cross_kv is not None:
            self.cross_kv[:, :, dst, :, :cross_len] = self.cross_kv[:, :, src, :, :cross_len]


@dataclass(frozen=True)
class KVPlan:
    """How many sequences of how many positions the KV budget holds."""

    num_seqs: int  # slots allocated: min(--max-num-seqs, what fits)
    num_fit: int  # slots the budget holds
    max_positions: int
    bytes_per_seq: int
    budget_bytes: int | None  # None: no budget given, --max-num-seqs allocated as asked

    def describe(self, max_num_seqs: int) -> str:
        if self.budget_bytes is None:
            return f"KV cache: {self.num_seqs} sequences x {self.max_positions} positions (no budget set)"
        line = (
            f"KV cache: budget {self.budget_bytes / 2**20:.1f} MiB holds {self.num_fit} sequences x "
            f"{self.max_positions} positions ({self.bytes_per_seq / 2**20:.2f} MiB each); "
            f"using {self.num_seqs} ({self.num_seqs * self.bytes_per_seq / 2**20:.1f} MiB)"
        )
        if self.num_seqs < max_num_seqs:
            line += (
                f"; --max-num-seqs {max_num_seqs} capped to {self.num_seqs} (raise --kv-cache-bytes or lower "
                "--max-model-len for more)"
            )
        return line


def plan_kv_cache(
    bytes_per_seq: int, max_positions: int, max_num_seqs: int, budget_bytes: int | None
) -> KVPlan:
    """Slots for `max_num_seqs` sequences, capped to what `budget_bytes` holds. Raises KVBudgetError."""
    if budget_bytes is None:
        return KVPlan(max_num_seqs, max_num_seqs, max_positions, bytes_per_seq, None)
    num_fit = budget_bytes // bytes_per_seq
    if num_fit < 1:
        raise KVBudgetError(
            f"the KV cache budget ({budget_bytes} bytes, {budget_bytes / 2**20:.1f} MiB) cannot hold one "
            f"sequence of {max_positions} positions ({bytes_per_seq} bytes); raise --kv-cache-bytes "
            f"(PREFIXSERVE_KV_CACHE_BYTES) to at least {bytes_per_seq}, lower --max-model-len, use a "
            "smaller --dtype, or free memory on the device"
        )
    return KVPlan(min(max_num_seqs, num_fit), num_fit, max_positions, bytes_per_seq, budget_bytes)


@dataclass(frozen=True)
class PoolPlan:
    """How many blocks the KV budget holds (`--kv-layout paged`), and what that is in sequences."""

    num_blocks: int  # allocated, the zero block included
    block_size: int
    bytes_per_block: int
    max_positions: int
    num_seqs: int  # rows of the running batch: --max-num-seqs (the pool admits by blocks)
    budget_bytes: int | None  # None: no budget given, as many blocks as --max-num-seqs full slots
    # encoder-decoder: a sequence of n positions also holds its source's n cross entries in the pool
    is_encoder_decoder: bool = False

    def num_sequences(self, num_positions: int) -> int:
        """Sequences of `num_positions` own positions (and as long a source) the pool holds at once."""
        parts = 2 if self.is_encoder_decoder else 1
        return (self.num_blocks - 1) // (parts * -(-num_positions // self.block_size))

    def describe(self, max_num_seqs: int) -> str:
        budget = (
            "no budget set" if self.budget_bytes is None else f"budget {self.budget_bytes / 2**20:.1f} MiB"
        )
        typical = min(256, self.max_positions)
        full, short = f"{self.max_positions}", f"{typical}"
        stored = "prefixes stored once in"
        if self.is_encoder_decoder:  # n source positions (cross entries) and n decoder positions
            full, short = f"{full} source + {full} decoder", f"{typical} + {typical}"
            stored = "prefixes (decoder and cross entries) stored once and the sources' cross entries in"
        return (
            f"KV pool (paged): {budget} holds {self.num_blocks - 1} blocks of {self.block_size} positions "
            f"({self.bytes_per_block / 2**10:.1f} KiB each): {self.num_sequences(self.max_positions)} sequences of "
            f"{full} positions, {self.num_sequences(typical)} of {short}; {stored} the same blocks (each prefix "
            "its only device copy: any block running sequences do not hold; unreferenced ones given back least "
            f"recently used first); at most {min(max_num_seqs, self.num_seqs)} running (--max-num-seqs)"
        )


def plan_block_pool(
    bytes_per_block: int,
    block_size: int,
    max_positions: int,
    max_num_seqs: int,
    budget_bytes: int | None,
    is_encoder_decoder: bool = False,
    num_reserved: int = 0,
) -> PoolPlan:
    """Blocks for `budget_bytes` (without one: the memory of `max_num_seqs` full slots), less `num_reserved`
    allocated beside the pool (the CUDA graphs' scratch block). Raises KVBudgetError when not even one full-length
    sequence fits (encoder-decoder: with a full-length source's cross entries)."""
    parts = 2 if is_encoder_decoder else 1
    per_seq = parts * -(-max_positions // block_size)
    if budget_bytes is None:
        return PoolPlan(
            max_num_seqs * per_seq + 1,
            block_size,
            bytes_per_block,
            max_positions,
            max_num_seqs,
            None,
            is_encoder_decoder,
        )
    num_blocks = budget_bytes // bytes_per_block - num_reserved
    # the zero block, and one more per part: a prefix's last block is not shared with its sequence's first
    if num_blocks < per_seq + 1 + parts:
        need = (per_seq + 1 + parts + num_reserved) * bytes_per_block
        what = "and a source of as many " if is_encoder_decoder else ""
        raise KVBudgetError(
            f"the KV cache budget ({budget_bytes} bytes) cannot hold one sequence of {max_positions} positions "
            f"{what}in blocks of {block_size} ({need} bytes); raise --kv-cache-bytes "
            f"(PREFIXSERVE_KV_CACHE_BYTES) to at least {need}, lower --max-model-len, use a smaller --dtype, or "
            "free memory on the device"
        )
    return PoolPlan(
        num_blocks, block_size, bytes_per_block, max_positions, max_num_seqs, budget_bytes, is_encoder_decoder
    )


def available_memory(device: torch.device) -> int:
    """Bytes free on the device now: CUDA's free memory, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_budget(available_bytes: int, reserved_bytes: int) -> int:
    """DEFAULT_KV_SHARE of what is left after the model (already loaded) and `reserved_bytes` (prefix cache)."""
    return max(0, int((available_bytes - reserved_bytes) * DEFAULT_KV_SHARE))


def kv_budget(
    kv_cache_bytes: int | None,
    prefix_cache_bytes: int,
    device: torch.device,
    available: Callable[[torch.device], int] = available_memory,
) -> int:
    """`kv_cache_bytes` (--kv-cache-bytes) when given; else DEFAULT_KV_SHARE of the memory `available` on the
    device now that the model is loaded, less the prefix cache's budget, with a line saying so. Called by the
    process that loaded the weights (the server, or its runner process with --runner-process)."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    free = available(device)
    budget = default_kv_budget(free, prefix_cache_bytes)
    log.info(
        "KV cache budget %.1f MiB: %d%% of the %.1f MiB free on %s after loading the model, less %.1f MiB for "
        "the prefix cache (--cache-bytes; none where it is on the host: --kv-layout paged on CUDA); set "
        "--kv-cache-bytes to choose",
        budget / 2**20,
        round(DEFAULT_KV_SHARE * 100),
        free / 2**20,
        device,
        prefix_cache_bytes / 2**20,
    )
    return budget
