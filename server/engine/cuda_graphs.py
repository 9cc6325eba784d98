"""CUDA graphs for GPT-2 decode steps: one graph launch instead of a launch per kernel, because an eager
decode step is launch-bound (the host queues kernels slower than the GPU runs them).

A graph has fixed shapes, so a step is padded to a bucket (vLLM's and nano-vllm's approach):
- rows: B is rounded up to 1, 2, 4, 8 or a multiple of 16 (at most the cache's slots). Pad rows feed token 0
  at position 0 of the free slots [B, bucket) (running sequences always occupy [0, B)): garbage but finite, and
  never read, because the next occupant of a slot writes position 0 in its prefill before any decode reads it.
- keys: the attention reads entries [0, L), L = the longest sequence + 1 rounded up to LENGTH_STEP; entries
  past a row's position are masked, as for every row shorter than the longest.
Each (rows, keys) bucket is captured on first use (warm-up, then capture, on a side stream). All graphs share
one memory pool and one static logits buffer, so the pool holds about one step's activations, not one per
graph; logits are copied out so the next replay cannot overwrite them. BART's decode and every prefill run
eagerly; `capture=False` runs the same padded shapes eagerly (what the CPU tests check for exactness).

`--kv-layout paged` (PagedDecodeGraphs): every row's block table, P and shift are step inputs too, so they live in
a fixed buffer (StaticBlockTables) filled in place before each replay, with one host-to-device copy. The keys
bucket bounds the blocks each row gathers (keys / block_size table columns, zero-block padded). Pad rows get
P = 0, shift 0 and a table naming only the cache's scratch block (past the pool's blocks, in no sequence's table):
their write at position 0 lands there, and they read it and the zero block, so a pad row touches no real block.
Design: docs/design/engine.md; figures: bench/README.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from server.engine.decoder_inputs import Attention
from server.engine.paged_cache import PagedKVCache
from server.engine.transfer import copy_to_device

log = logging.getLogger("prefixserve.engine")

LENGTH_STEP = 128


def batch_buckets(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: 1, 2, 4, 8, then multiples of 16, and `max_rows` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


class DecodeGraphs:
    """`__call__(tokens, positions, length)` = `backbone.decode(cache, ...)` for rows [0, B), via graphs (the slot
    layout; PagedDecodeGraphs below for the paged one)."""

    def __init__(self, backbone, cache, max_rows: int, capture: bool = True):
        self.backbone = backbone
        self.cache = cache
        self.capture = capture
        self.buckets = batch_buckets(max_rows)
        self.max_positions = self._max_keys()
        device = backbone.device
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.logits = torch.zeros(max_rows, backbone.lm_head.out_features, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the graphs' shared memory pool, from the first capture on

    def bucket(self, num_rows: int, length: int) -> tuple[int, int]:
        rows = next(b for b in self.buckets if b >= num_rows)
        keys = min(math.ceil(length / LENGTH_STEP) * LENGTH_STEP, self.max_positions)
        return rows, keys

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        num_rows = tokens.shape[0]
        rows, keys = self.bucket(num_rows, length)
        self.tokens[:num_rows].copy_(tokens)
        self.positions[:num_rows].copy_(positions)
        if rows > num_rows:  # pad rows: token 0 at position 0 (see the module docstring)
            self.tokens[num_rows:rows].zero_()
            self.positions[num_rows:rows].zero_()
        self._fill(num_rows, rows, keys)
        if not self.capture:
            self._run(rows, keys)
        else:
            graph = self.graphs.get((rows, keys)) or self._capture(rows, keys)
            graph.replay()
        return self.logits[:num_rows].clone()

    def _max_keys(self) -> int:
        return self.cache.self_kv.shape[4]

    def _fill(self, num_rows: int, rows: int, keys: int) -> None:
        """The step's other inputs into their fixed buffers (the slot layout has none)."""

    def _run(self, rows: int, keys: int) -> None:
        """The captured region: device work only, reading the fixed buffers (no host copy, no host wait)."""
        logits = self.backbone.decode(self.cache, self.tokens[:rows], self.positions[:rows], keys)
        self.logits[:rows].copy_(logits)

    def _capture(self, rows: int, keys: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream(self.backbone.device)
        stream.wait_stream(torch.cuda.current_stream(self.backbone.device))
        with torch.cuda.stream(stream):
            self._run(rows, keys)  # lazy inits (cuBLAS workspaces, kernels) happen outside the capture
        torch.cuda.current_stream(self.backbone.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prefix cache's worker thread may copy a prefix on its own stream meanwhile
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            self._run(rows, keys)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(rows, keys)] = graph
        log.debug("captured a decode graph for %d rows x %d keys", rows, keys)
        return graph


class PagedDecodeGraphs(DecodeGraphs):
    """DecodeGraphs for `--kv-layout paged`: the block tables, P and shift of rows [0, B) are fixed buffers too."""

    def __init__(self, backbone, cache: PagedKVCache, max_rows: int, capture: bool = True):
        super().__init__(backbone, cache, max_rows, capture)
        self.tables = StaticBlockTables(cache, max_rows)

    def _max_keys(self) -> int:
        return self.cache.tables.shape[1] * self.cache.block_size

    def _fill(self, num_rows: int, rows: int, keys: int) -> None:
        self.tables.fill(num_rows, rows, -(-keys // self.cache.block_size))

    def _run(self, rows: int, keys: int) -> None:
        logits = self.backbone.decode(self.tables, self.tokens[:rows], self.positions[:rows], keys)
        self.logits[:rows].copy_(logits)


class StaticBlockTables:
    """A paged decode step's per-row inputs in one fixed device buffer, passed to `backbone.decode` as its cache:
    `decode_attention` reads the buffer (device ops only), `write` and `attend` act on the cache's blocks."""

    def __init__(self, cache: PagedKVCache, max_rows: int):
        if cache.scratch_block is None:
            raise ValueError(
                "a graph-replayed paged decode needs the cache's scratch block (has_scratch_block)"
            )
        self.cache = cache
        self.scratch_block: int = cache.scratch_block
        width = cache.tables.shape[1]
        # [max_rows, 2 + width]: P, shift, then the block table (zero-block padded)
        self.rows = torch.zeros(max_rows, 2 + width, dtype=torch.long, device=cache.device)

    def fill(self, num_rows: int, rows: int, num_blocks: int) -> None:
        """Rows [0, num_rows) from the cache's host arrays, pad rows [num_rows, rows) reading and writing the
        scratch block only; `num_blocks` table columns (the keys bucket's). One copy (pinned on CUDA)."""
        cache = self.cache
        host = np.zeros((rows, 2 + num_blocks), dtype=np.int64)
        host[:num_rows, 0] = cache.num_prefix[:num_rows]
        host[:num_rows, 1] = cache.shift[:num_rows]
        host[:num_rows, 2:] = cache.tables[:num_rows, :num_blocks]
        host[num_rows:, 2] = self.scratch_block
        (on_device,) = copy_to_device([torch.from_numpy(host)], cache.device)
        self.rows[:rows, : 2 + num_blocks].copy_(on_device)

    def decode_attention(self, positions: torch.Tensor, length: int) -> Attention:
        """Rows [0, B) at `positions` [B] read `length` logical keys (the keys bucket): their first
        ceil(length / block_size) table columns, as `fill` wrote them."""
        num_blocks = -(-length // self.cache.block_size)
        rows = self.rows[: positions.shape[0]]
        return self.cache.block_attention(
            rows[:, 2 : 2 + num_blocks], rows[:, 0], rows[:, 1], positions, in_place=False
        )

    def write(self, layer: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, flat, k, v)

    def attend(
        self, layer: int, q: torch.Tensor, attention: Attention, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """SDPA of q [n, H_kv, G, d] over each row's gathered blocks (a fresh buffer: see PagedKVCache.read)."""
        keys, values = self.cache.read(layer, attention.read, reuse=False)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
