"""bench/stream_interval.py runs end to end on a tiny load (two real servers over HTTP): every round brought
back every token, and the report names both intervals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stream_interval_bench_runs_on_a_tiny_load() -> None:
    command = [sys.executable, "-m", "bench.stream_interval", "--layers", "1", "--width", "32", "--heads", "1",
               "--vocab", "500", "--requests", "4", "--new-tokens", "6", "--rounds", "1", "--interval", "3"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for interval in (1, 3):
        for mode in ("greedy", "sampled", "sampled+streamed", "streamed / greedy", "streamed / sampled"):
            assert any(line.startswith(f"--stream-interval {interval}") and mode in line for line in lines), (
                interval,
                mode,
                done.stdout,
            )
