"""bench/host_path.py's engine-alone figure and bench/decode_attention.py run end to end on tiny loads (the
tests' tiny GPT-2, a few prompts of the benches' shape): every request is stepped to its last token, and the
attention layouts are timed side by side. No timing is asserted, only that the figures exist."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch


def test_the_engine_alone_runs_every_request_to_its_last_token(
    tiny_gpt2_dir: Path, tiny_workload, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.host_memory
    from bench.host_path import engine_cpu_per_token

    # the bench sets its process's malloc thresholds and torch threads, as the server does: not the test run's
    monkeypatch.setattr(server.host_memory, "retain_freed_memory", lambda environ: "left alone")
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    us_per_token = engine_cpu_per_token(tiny_gpt2_dir, tiny_workload(6, 3), new_tokens=4, num_prefixes=3)
    assert math.isfinite(us_per_token) and us_per_token >= 0


def test_decode_attention_times_the_slot_cache_beside_a_contiguous_one() -> None:
    from bench.decode_attention import layouts_of

    args = argparse.Namespace(copies=1, rounds=1, repeats=1)
    layouts = layouts_of(rows=4, heads=2, head_dim=8, length=20, args=args)
    assert set(layouts) == {"contiguous", *(f"slot cache, max_positions {n}" for n in (256, 1024, 2048))}
