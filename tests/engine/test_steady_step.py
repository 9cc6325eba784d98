"""A steady decode step's Python work does not grow with its rows: no loop over rows in the scheduler, the
runner, the sampler or the engine (its step and the hand-over of its record) when nobody joins or leaves.

Counted as the Python lines executed (sys.settrace), the way the host-sync tests count syncs: a loop over
rows, however cheap, executes at least one line per row. The rows mix greedy, temperature, top-k and top-p
requests of several tenants, some held off their EOS and stop token ids by min_tokens (whole responses: they
read their tokens once, at the end).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams

MIX = [
    SamplingParams(max_new_tokens=200, ignore_eos=True),
    # vLLM's min_tokens holding off EOS and stop token ids: masked by array operations, no loop over rows
    SamplingParams(max_new_tokens=200, temperature=0.8, seed=1, min_tokens=150, stop_token_ids=(1, 2, 3)),
    SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=0.9, top_k=5),
    SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=1.1, top_p=0.9, seed=3),
]


def count_lines(fn) -> int:
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return lines


def lines_per_steady_step(backbone, num_rows: int) -> list[int]:
    engine = Engine(backbone, EngineConfig(max_num_seqs=num_rows))
    loop = asyncio.new_event_loop()

    async def add() -> None:
        for i in range(num_rows):
            engine.add([5, 6, 7 + i % 5], MIX[i % len(MIX)], tenant=f"t{i % 3}", each_token=False)

    loop.run_until_complete(add())
    for _ in range(3):  # everyone joins, then a step with nobody joining
        engine.step()
    assert engine.num_running == num_rows and engine.num_waiting == 0
    counts = []
    for _ in range(4):
        record = None

        def one_step() -> None:
            nonlocal record
            record = engine.step()
            engine._hand_over_record(loop, record)

        counts.append(count_lines(one_step))
        assert record is not None and record.progress.rows.size == num_rows
    loop.close()
    return counts


def test_a_steady_step_runs_no_python_loop_over_rows(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    lines = {n: min(lines_per_steady_step(backbone, n)) for n in (4, 16, 64)}
    # a loop over rows would add at least 60 lines between 4 and 64 rows
    assert max(lines.values()) - min(lines.values()) < 20, lines
