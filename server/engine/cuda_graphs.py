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
Design: docs/design/engine.md; figures: bench/README.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger("prefixserve.engine")

LENGTH_STEP = 128


def batch_buckets(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: 1, 2, 4, 8, then multiples of 16, and `max_rows` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


class DecodeGraphs:
    """`__call__(tokens, positions, length)` = `backbone.decode(cache, ...)` for rows [0, B), via graphs."""

    def __init__(self, backbone, cache, max_rows: int, capture: bool = True):
        self.backbone = backbone
        self.cache = cache
        self.capture = capture
        self.buckets = batch_buckets(max_rows)
        self.max_positions = cache.self_kv.shape[4]
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
        if not self.capture:
            self._run(rows, keys)
        else:
            graph = self.graphs.get((rows, keys)) or self._capture(rows, keys)
            graph.replay()
        return self.logits[:num_rows].clone()

    def _run(self, rows: int, keys: int) -> None:
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
