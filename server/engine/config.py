"""The engine's one frozen config, passed down to the scheduler and the runner (and across to the runner's
process). Checked once, here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_prefill_tokens: int = 4096
    max_model_len: int = 1024
    max_prefix_tokens: int = 256
    max_queue: int = 1024  # requests waiting for a busy slot; beyond it only tenants within their share
    policy: str = "fair"  # "fair" (VTC, see scheduler.py) or "fifo"
    max_step_seconds: float = 60.0  # a loop busy this long without finishing a step counts as stuck
    kv_cache_bytes: int | None = None  # KV budget: max_num_seqs is capped to what fits; None = no cap
    cuda_graphs: bool = True  # GPT-2 decode steps as CUDA graphs on CUDA (cuda_graphs.py)
    # with a runner that takes steps without waiting (the runner process): step k+1 is scheduled and sent
    # while the runner computes step k, and step k's tokens are recorded meanwhile (engine.py)
    overlap: bool = True
    kv_layout: str = "slots"  # "slots" (kv_cache.py) or "paged" (block_pool.py, paged_cache.py)
    kv_block_size: int = 16  # positions per block (paged)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", "max_model_len", "max_prefix_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.policy not in ("fair", "fifo"):
            raise ValueError("policy must be 'fair' or 'fifo'")
        if self.max_step_seconds <= 0:
            raise ValueError("max_step_seconds must be > 0")
        if self.kv_layout not in ("slots", "paged"):
            raise ValueError("kv_layout must be 'slots' or 'paged'")
        if self.kv_block_size < 1:
            raise ValueError("kv_block_size must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 0:
            raise ValueError("kv_cache_bytes must be >= 0")
