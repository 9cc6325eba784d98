"""bench/neighbours.py runs end to end on the tests' tiny GPT-2: the engine's real decode step timed alone and
beside each neighbour process (really started, and gone afterwards), the attention and copy rates, the table
printed. The bench's own backbone needs tokenizer data from outside the repository; here it is the tests'."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_neighbours_bench_times_the_step_beside_each_neighbour(
    tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from bench import neighbours

    monkeypatch.setattr(neighbours, "build_backbone", lambda *args: tiny_gpt2_dir)
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def recorded(*args, **kwargs):
        process = popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(neighbours.subprocess, "Popen", recorded)
    argv = ["bench.neighbours", "--rows", "4", "--length", "16", "--steps", "3", "--repeats", "2"]
    argv.append("--no-record")
    monkeypatch.setattr(sys, "argv", argv)
    neighbours.main()

    # one neighbour process per neighbour round, each one running the neighbour's code, and none left behind
    assert [p.args[-1] for p in started] == [
        neighbours.NEIGHBOURS[k] for _ in range(2) for k in ("compute", "memory")
    ]
    assert all(p.poll() is not None for p in started)
    out = capsys.readouterr().out
    for kind in neighbours.KINDS:
        row = next(line for line in out.splitlines() if line.startswith(kind + " "))
        median, x_alone = float(row.split()[1]), float(row.split()[-1])
        assert median > 0 and x_alone > 0
    assert "reading K/V at" in out and "a plain copy" in out


def test_neighbour_processes_run_their_work() -> None:
    """Each neighbour's code is a program that keeps running (it is killed, not awaited)."""
    from bench import neighbours

    for code in neighbours.NEIGHBOURS.values():
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
        finally:
            process.kill()
            process.wait()
