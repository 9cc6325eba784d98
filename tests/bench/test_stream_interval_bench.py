"""bench/stream_interval.py runs end to end on a tiny load (two real servers over HTTP): every round brought
back every token, and the report names both intervals. The bench's prompts and its backbone's tokenizer come
from data outside the repository; here the prompts are a few lines of their shape and the backbone is the
tests' tiny GPT-2 (the servers, the uploads and the rounds are real)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def test_stream_interval_bench_runs_on_a_tiny_load(
    tiny_gpt2_dir: Path, tiny_workload, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from bench import sampling, stream_interval

    monkeypatch.setattr(stream_interval, "build_backbone", lambda *args: tiny_gpt2_dir)
    monkeypatch.setattr(sampling, "workload", tiny_workload)
    monkeypatch.setattr(stream_interval, "workload", tiny_workload)
    argv = ["bench.stream_interval", "--prefixes", "2", "--requests", "4", "--new-tokens", "6", "--rounds", "1", "--interval", "3"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    stream_interval.main()  # raises when a round brings back fewer tokens than asked
    lines = capsys.readouterr().out.splitlines()
    for interval in (1, 3):
        for mode in ("greedy", "sampled", "sampled+streamed", "streamed / greedy", "streamed / sampled"):
            assert any(line.startswith(f"--stream-interval {interval}") and mode in line for line in lines), (
                interval,
                mode,
                lines,
            )
