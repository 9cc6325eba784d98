"""The paged KV cache's tensors (`--kv-layout paged`): the blocks block_pool.py hands out, and the block table of
every slot of the persistent batch (BART: two, its decoder's and its cross entries'). It answers the layers the
way the slot cache (kv_cache.py) does: `prefill_inputs` / `decode_attention` build a forward's `Attention` once,
`write` and `read` serve each layer (BART's cross entries: `cross_where`, `write_cross`, `cross_attention`).

Layout: kv [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]. A block's entries are contiguous,
so one layer's keys are a flat table [num_blocks * block_size, H, d] that writes index by entry.

A row reads its table's blocks side by side ("logical" key index k). Its prefix's P entries are k in [0, P); its
own tokens start in a fresh block, at k = num_prefix_blocks * block_size, so the token at position p (>= P) sits
at k = p + shift, shift = num_prefix_blocks * block_size - P. A query at position p sees key k iff k < P or
P + shift <= k <= p + shift: positions stay PEFT's (real tokens from P), the gap between is masked. Masked
entries still enter the matmul with weight 0, so every block is zeroed when it is handed out (0 * NaN = NaN).

BART's cross entries live in the same blocks: a slot's cross table is [its cross prefix's blocks | its source's],
with the same logical layout (the cross prefix is k in [0, P_c), source token j at k = P_c + shift_c + j), read by
every decoder query as if it stood at "position" P_c + source length - 1.

A decode step on CPU in float32 reads the blocks in place (paged_kernel.py: a small C++ kernel built on first
use). Otherwise (prefill, other devices or dtypes, no compiler) each row's blocks are gathered into a contiguous
[n, H, K, d] buffer before SDPA: one more copy of what a layer reads. bench/kv_capacity.py measures both against
the slot cache. A decode step replayed as a CUDA graph (cuda_graphs.py) reads its tables, P and shift from fixed
buffers (StaticBlockTables) and gathers too; its pad rows write the scratch block, one block past the pool's that
no table of a sequence names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefix_store.format import BackboneShape
from server.engine import paged_kernel
from server.engine.block_pool import SeqBlocks
from server.engine.decoder_inputs import Attention, PrefillInputs, padded_queries
from server.engine.transfer import copy_to_device

# the prefix targets the pool holds as blocks: kept on the host by the prefix cache, so a prefix has one device
# copy, in the pool (app.py)
POOLED_TARGETS = frozenset({"decoder", "cross"})


class PagedKVCache:
    def __init__(
        self,
        shape: BackboneShape,
        num_blocks: int,
        block_size: int,
        max_slots: int,
        max_blocks_per_seq: int,
        device: torch.device,
        dtype: torch.dtype,
        use_kernel: bool = True,
        max_cross_blocks: int = 0,
        has_scratch_block: bool = False,
    ):
        self.block_size = block_size
        # block `num_blocks`, past the pool's: where pad rows of a graph-replayed step write (None: no such rows)
        self.scratch_block = num_blocks if has_scratch_block else None
        self.kv = torch.zeros(
            shape.num_layers,
            2,
            num_blocks + has_scratch_block,
            block_size,
            shape.kv_heads,
            shape.head_dim,
            device=device,
            dtype=dtype,
        )
        self.device = device
        self._scratch = self.kv.new_empty(2, 0, *self.kv.shape[3:])  # read's gathered blocks, reused
        # the CPU decode kernel (float32): blocks read in place; None: gathered (every other case)
        self.kernel = (
            paged_kernel.load() if use_kernel and device.type == "cpu" and dtype == torch.float32 else None
        )
        # by slot of the persistent batch; compacted with it (remove)
        self.tables = np.zeros((max_slots, max_blocks_per_seq), dtype=np.int64)  # 0-padded (the zero block)
        self.num_prefix = np.zeros(max_slots, dtype=np.int64)  # P
        self.shift = np.zeros(max_slots, dtype=np.int64)  # logical index of position p is p + shift
        self.num_table = np.zeros(max_slots, dtype=np.int64)  # blocks in the table
        # encoder-decoder: the cross table [cross prefix's blocks | source's], P_c and its shift, by slot
        self.cross_tables = np.zeros((max_slots, max(max_cross_blocks, 1)), dtype=np.int64)
        self.cross_prefix = np.zeros(max_slots, dtype=np.int64)
        self.cross_shift = np.zeros(max_slots, dtype=np.int64)
        self.num_cross_table = np.zeros(max_slots, dtype=np.int64)

    @staticmethod
    def bytes_per_block(shape: BackboneShape, block_size: int, dtype: torch.dtype) -> int:
        return shape.num_layers * 2 * shape.kv_heads * shape.head_dim * block_size * dtype.itemsize

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # -- slots: joined and removed with the persistent batch -------------------------------------------------
    def join(self, slot: int, blocks: SeqBlocks, cross: SeqBlocks | None = None) -> None:
        """A slot's table (and, encoder-decoder, its cross table: see split_encoder_decoder)."""
        _set(slot, blocks, self.block_size, self.tables, self.num_table, self.num_prefix, self.shift)
        if cross is not None:
            arrays = (self.cross_tables, self.num_cross_table, self.cross_prefix, self.cross_shift)
            _set(slot, cross, self.block_size, *arrays)

    def remove(self, slot: int, last: int) -> None:
        """Slot `slot` is freed: the last slot's table moves into it (InputBatch.remove does the same)."""
        for array in (
            self.tables,
            self.num_prefix,
            self.shift,
            self.num_table,
            self.cross_tables,
            self.cross_prefix,
            self.cross_shift,
            self.num_cross_table,
        ):
            array[slot] = array[last]

    def append(self, slot: int, blocks: list[int]) -> None:
        """More blocks at the end of a slot's table (a sequence growing into them)."""
        count = int(self.num_table[slot])
        self.tables[slot, count : count + len(blocks)] = blocks
        self.num_table[slot] = count + len(blocks)

    # -- blocks ----------------------------------------------------------------------------------------
    def zero(self, blocks: list[int]) -> None:
        if blocks:
            self.kv[:, :, torch.tensor(blocks, device=self.device)] = 0

    def write_prefix(self, blocks: list[int], decoder: torch.Tensor) -> None:
        """A prefix's `decoder` target [L, 2, H_kv, P, d] into its (zeroed) blocks, entry j at block j // B. The
        target is the host copy (pinned on CUDA: no host wait): the blocks are the prefix's only device copy."""
        decoder = decoder.to(self.device, self.kv.dtype, non_blocking=True)
        num_layers, _, heads, num_tokens, head_dim = decoder.shape
        padded = decoder.new_zeros(num_layers, 2, len(blocks) * self.block_size, heads, head_dim)
        padded[:, :, :num_tokens] = decoder.transpose(2, 3)
        index = torch.tensor(blocks, device=self.device)
        self.kv[:, :, index] = padded.view(num_layers, 2, len(blocks), self.block_size, heads, head_dim)

    def copy_own(self, src: list[int], dst: list[int], start: int, end: int) -> None:
        """Slots dst take slots src's own entries for positions [start, end) (beam search), whole blocks at a
        time, from the block holding position `start` (also when start == end: the part of that block before
        `start` is the group's shared prompt, which a forking beam needs in its own copy of the block)."""
        if not src:
            return
        first = (start + self.shift[src]) // self.block_size
        stop = np.maximum(-(-(end + self.shift[src]) // self.block_size), first + 1)
        src_blocks = np.concatenate([self.tables[s, a:b] for s, a, b in zip(src, first, stop, strict=True)])
        dst_blocks = np.concatenate([self.tables[d, a:b] for d, a, b in zip(dst, first, stop, strict=True)])
        src_t, dst_t = (
            torch.from_numpy(src_blocks).to(self.device),
            torch.from_numpy(dst_blocks).to(self.device),
        )
        self.kv[:, :, dst_t] = self.kv[:, :, src_t]  # gathered into a new tensor first: overlap is safe

    # -- one forward's access ----------------------------------------------------------------------------
    def prefill_inputs(
        self, start: int, token_lists: list[list[int]], prefix_lens: list[int], device: torch.device
    ) -> PrefillInputs:
        """New sequences in slots [start, start+n) (joined, prefix blocks written): built on the host, one copy."""
        n, size = len(token_lists), self.block_size
        slots = slice(start, start + n)
        lens, valid, ids, positions = padded_queries(token_lists, prefix_lens)
        row_prefix, num_q = np.asarray(prefix_lens, dtype=np.int64), valid.shape[1]
        row_shift = self.shift[slots]
        # never write past a table (into block 0 or another row's block): the grants must cover the prompt
        assert ((row_prefix + lens - 1 + row_shift) // size < self.num_table[slots]).all(), (
            "prefill past the slot's blocks"
        )
        logical = (positions + row_shift[:, None])[valid]  # [N] each real query's logical entry
        table_rows = np.repeat(np.arange(start, start + n), lens)
        flat = self.tables[table_rows, logical // size] * size + logical % size
        num_blocks = int(-(-(lens + row_prefix + row_shift).max() // size))
        last = np.arange(n) * num_q + lens - 1
        host = [
            ids,
            positions,
            flat,
            np.flatnonzero(valid),
            last,
            self.tables[slots, :num_blocks],
        ]
        host += [self.num_prefix[slots], self.shift[slots]]
        ids_t, positions_t, flat_t, queries_t, last_t, tables, num_prefix, shift = copy_to_device(
            [torch.from_numpy(np.ascontiguousarray(a)) for a in host], device
        )
        mask = _mask(positions_t, num_prefix[:, None], shift[:, None], num_blocks * size)[:, None]
        return PrefillInputs(ids_t, positions_t, last_t, Attention(flat_t, queries_t, tables, mask))

    def decode_length(self, seq_len: np.ndarray) -> int:
        """Logical keys a decode step of slots [0, B) reads (seq_len [B]: each slot's next position)."""
        logical = seq_len + self.shift[: seq_len.size]
        # the position each slot writes lies in its table (the scheduler grows tables before the step)
        assert (logical // self.block_size < self.num_table[: seq_len.size]).all(), (
            "decode past a slot's blocks"
        )
        return int(logical.max()) + 1

    def decode_attention(self, positions: torch.Tensor, length: int) -> Attention:
        """Slots [0, B) decode one token each at `positions` [B] (device), reading `length` logical keys."""
        n = positions.shape[0]
        num_blocks = -(-length // self.block_size)
        tables, num_prefix, shift = copy_to_device(
            [
                torch.from_numpy(np.ascontiguousarray(a))
                for a in (self.tables[:n, :num_blocks], self.num_prefix[:n], self.shift[:n])
            ],
            positions.device,
        )
        return self.block_attention(tables, num_prefix, shift, positions, in_place=True)

    def block_attention(
        self,
        tables: torch.Tensor,
        num_prefix: torch.Tensor,
        shift: torch.Tensor,
        positions: torch.Tensor,
        in_place: bool,
    ) -> Attention:
        """One query per row at `positions` [n] through block `tables` [n, nb], P and shift [n] (all on the device;
        device ops only, so a CUDA graph can capture it). `in_place`: the CPU kernel may read the blocks."""
        size = self.block_size
        logical = positions + shift
        rows = torch.arange(positions.shape[0], device=positions.device)
        flat = tables[rows, logical // size] * size + logical % size
        mask = _mask(positions[:, None], num_prefix[:, None], shift[:, None], tables.shape[1] * size)
        # query i of the [B, 1] batch is flat index i
        kernel_rows = (num_prefix, shift, positions) if in_place else None
        return Attention(flat, rows, tables, mask[:, None], kernel_rows)

    def attend(
        self, layer: int, q: torch.Tensor, attention: Attention, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of q [n, H_kv, G, d] (G query rows per key/value head) over each row's blocks: a decode step
        through the kernel where it is built (blocks read in place), else the blocks gathered, then SDPA."""
        if attention.rows is not None and self.kernel is not None:
            num_prefix, shift, positions = attention.rows
            kv = self.kv[layer]
            # the kernel reads raw pointers: every input contiguous (no-ops here)
            inputs = [t.contiguous() for t in (q, attention.read, num_prefix, shift, positions)]
            return self.kernel.paged_decode(inputs[0], kv[0], kv[1], *inputs[1:], scale)
        keys, values = self.read(layer, attention.read)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    # -- BART's cross entries: written once by the encoder, read by every decoder layer -------------------------
    def cross_where(self, rows: np.ndarray, cols: np.ndarray, device: torch.device) -> torch.Tensor:
        """Flat entries (write_cross's index) of slots `rows`' cross entries `cols` [N] (P_c + source index)."""
        logical = cols + self.cross_shift[rows]
        # never write past a cross table: the grants cover the whole source
        assert (logical // self.block_size < self.num_cross_table[rows]).all(), "encode past the cross blocks"
        flat = (
            self.cross_tables[rows, logical // self.block_size] * self.block_size + logical % self.block_size
        )
        return copy_to_device([torch.from_numpy(np.ascontiguousarray(flat))], device)[0]

    def write_cross(self, layer: int, where: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        self.write(layer, where, k, v)  # cross entries are entries of the same blocks

    def cross_attention(self, start: int, cross_lens: torch.Tensor, cross_length: int) -> Attention:
        """Slots [start, start+n) read their cross entries (cross_lens [n] on the device: P_c + source). Every
        query of a row sees the same keys, so the decode kernel serves any number of them (a resumed prefill)."""
        n = cross_lens.shape[0]
        slots = slice(start, start + n)
        num_blocks = int(self.num_cross_table[slots].max())
        tables, num_prefix, shift = copy_to_device(
            [
                torch.from_numpy(np.ascontiguousarray(a))
                for a in (
                    self.cross_tables[slots, :num_blocks],
                    self.cross_prefix[slots],
                    self.cross_shift[slots],
                )
            ],
            cross_lens.device,
        )
        last = cross_lens - 1  # the "position" every query of the row stands at
        mask = _mask(last[:, None], num_prefix[:, None], shift[:, None], num_blocks * self.block_size)
        rows = torch.arange(n, device=cross_lens.device)
        return Attention(None, rows, tables, mask[:, None], (num_prefix, shift, last))

    def attend_cross(self, layer: int, q: torch.Tensor, attention: Attention, scale: float) -> torch.Tensor:
        return self.attend(layer, q, attention, attention.mask, scale)

    def write(self, layer: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V [N, H, d] into entries `flat` [N] (block * block_size + offset) of `layer`."""
        kv = self.kv[layer]  # [2, num_blocks, B, H, d]
        kv[0].view(-1, *kv.shape[3:])[flat] = k
        kv[1].view(-1, *kv.shape[3:])[flat] = v

    def read(self, layer: int, tables: torch.Tensor, reuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [n, H, K, d] of rows whose block tables are `tables` [n, nb]: K = nb * block_size.
        Whole blocks by index_select into a reused buffer (advanced indexing, a gather along dim 1 or a fresh
        buffer per layer each cost more); the layer's attention reads it before the next layer overwrites it.
        `reuse=False` (a step a CUDA graph captures): a fresh buffer from the graph's pool, because the reused
        one is replaced when an eager step needs more and the graph would go on writing the freed one."""
        n, num_blocks = tables.shape
        flat = tables.reshape(-1)
        kv = self.kv[layer]  # [2, num_blocks, B, H, d]
        if not reuse:
            shape = (n, num_blocks * self.block_size, *kv.shape[3:])
            keys, values = kv[0].index_select(0, flat).view(shape), kv[1].index_select(0, flat).view(shape)
            return keys.transpose(1, 2), values.transpose(1, 2)
        if self._scratch.shape[1] < flat.numel():
            self._scratch = kv.new_empty(2, flat.numel(), *kv.shape[2:])
        shape = (n, num_blocks * self.block_size, *kv.shape[3:])
        keys = torch.index_select(kv[0], 0, flat, out=self._scratch[0, : flat.numel()]).view(shape)
        values = torch.index_select(kv[1], 0, flat, out=self._scratch[1, : flat.numel()]).view(shape)
        return keys.transpose(1, 2), values.transpose(1, 2)


def split_encoder_decoder(
    blocks: SeqBlocks, block_size: int, num_source: int, num_decoder_prefix: int, num_cross_prefix: int
) -> tuple[SeqBlocks, SeqBlocks]:
    """An encoder-decoder sequence's grant (block_pool.py: prefix [decoder | cross], own [source | decoder]) as its
    decoder table and its cross table."""
    prefix, own = blocks.table[: blocks.num_prefix_blocks], blocks.table[blocks.num_prefix_blocks :]
    num_decoder = -(-num_decoder_prefix // block_size)
    num_cross = -(-num_source // block_size)
    decoder_prefix, cross_prefix = prefix[:num_decoder], prefix[num_decoder:]
    decoder = SeqBlocks(
        decoder_prefix + own[num_cross:], len(decoder_prefix), num_decoder_prefix, blocks.is_prefix_new, []
    )
    cross = SeqBlocks(cross_prefix + own[:num_cross], len(cross_prefix), num_cross_prefix, False, [])
    return decoder, cross


def _set(
    slot: int,
    blocks: SeqBlocks,
    block_size: int,
    tables: np.ndarray,
    num_table: np.ndarray,
    num_prefix: np.ndarray,
    shift: np.ndarray,
) -> None:
    tables[slot] = 0
    tables[slot, : len(blocks.table)] = blocks.table
    num_table[slot] = len(blocks.table)
    num_prefix[slot] = blocks.num_prefix_tokens
    shift[slot] = blocks.num_prefix_blocks * block_size - blocks.num_prefix_tokens


def _mask(
    positions: torch.Tensor, num_prefix: torch.Tensor, shift: torch.Tensor, num_keys: int
) -> torch.Tensor:
    """[n, T, K] bool: the query at position p (positions [n, T]) sees logical key k iff k < P or
    P + shift <= k <= p + shift (num_prefix, shift [n, 1])."""
    keys = torch.arange(num_keys, device=positions.device)[None, None, :]
    own = (keys >= (num_prefix + shift)[:, :, None]) & (keys <= (positions + shift)[:, :, None])
    return (keys < num_prefix[:, :, None]) | own
