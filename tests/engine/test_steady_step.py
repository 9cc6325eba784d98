"""A steady decode step's Python work does not grow with its rows: no loop over rows in the scheduler, the
runner, the sampler or the engine (its step and the hand-over of its record) when nobody joins or leaves.

Counted as the Python lines executed (sys.settrace), the way the host-sync tests count syncs: a loop over
rows, however cheap, executes at least one line per row. The rows mix greedy, temperature, top-k and top-p
requests of several tenants, some held off their EOS and stop token ids by min_tokens (whole responses: they
read their tokens once, at the end). The server's default path is counted too: steps overlapped through the
runner process with the metrics hook on every forward, the front's side here and the child's replayed in this
process on the messages the real child was sent.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

from test_runner_process import spec as runner_spec

from server.engine import worker
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.step import StepMessage
from server.engine.worker import RunnerProcess
from server.metrics import Metrics

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


class _Recorded:
    """The front's end of the runner pipe, keeping a copy of every message it sends."""

    def __init__(self, conn):
        self.conn, self.sent = conn, []

    def send(self, message) -> None:
        if isinstance(message, StepMessage):
            self.sent.append(pickle.loads(pickle.dumps(message)))
        self.conn.send(message)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def lines_per_steady_overlapped_step(model_dir: Path, num_rows: int) -> tuple[list[int], list[int]]:
    """The server's default path: steps overlapped through the runner process, the metrics hook on each forward.
    Returns the Python lines of steady steps on the front (schedule, message, record, hand-over) and in the
    child (its _Child.step, replayed in this process on the messages the real child was sent)."""
    backbone = load_backbone(model_dir, "cpu", "float32", weights=False)
    spec = runner_spec(model_dir, num_rows, cuda_graphs=False, device="cpu")
    runner = RunnerProcess(spec)
    pipe = runner._conn = _Recorded(runner._conn)
    backbone.rules = runner.rules
    metrics = Metrics(SimpleNamespace(cache=None, engine=None))
    engine = Engine(
        backbone, EngineConfig(max_num_seqs=num_rows), runner=runner, on_forward=metrics.on_forward
    )
    runner.on_forward = metrics.on_forward
    assert engine.overlaps
    loop = asyncio.new_event_loop()

    async def add() -> None:
        for i in range(num_rows):
            engine.add([5, 6, 7 + i % 5], MIX[i % len(MIX)], prefix_id=f"p{i % 3}", tenant=f"t{i % 3}",
                       each_token=False)  # fmt: skip

    def one_step() -> None:
        for record in engine.overlapped_step():
            engine._hand_over_record(loop, record)

    try:
        loop.run_until_complete(add())
        for _ in range(4):  # everyone joins, then steps with nobody joining
            one_step()
        assert engine.num_running == num_rows and engine.num_waiting == 0
        steady_from = len(pipe.sent)
        front = [count_lines(one_step) for _ in range(4)]
    finally:
        runner.close()
        loop.close()
    # the child's runner as _build makes it, without _build's process-wide set_grad_enabled(False)
    child_backbone = load_backbone(model_dir, "cpu", "float32")
    child = worker._Child(
        ModelRunner(child_backbone, spec.engine_config(spec.kv_cache_bytes)), child_backbone
    )
    for message in pipe.sent[:steady_from]:
        child.step(message)
    in_child = [count_lines(lambda m=message: child.step(m)) for message in pipe.sent[steady_from:]]
    return front, in_child


def test_the_runner_process_path_runs_no_python_loop_over_rows(tiny_gpt2_dir: Path):
    counts = {n: lines_per_steady_overlapped_step(tiny_gpt2_dir, n) for n in (4, 16, 64)}
    front = {n: min(f) for n, (f, _) in counts.items()}
    in_child = {n: min(c) for n, (_, c) in counts.items()}
    assert max(front.values()) - min(front.values()) < 20, front
    assert max(in_child.values()) - min(in_child.values()) < 20, in_child
