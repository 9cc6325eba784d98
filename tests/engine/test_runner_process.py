"""--runner-process: the engine's runner in a spawned child gives what the runner in the engine's thread gives
(PEFT's tokens, seeded samples, penalties, logprobs, beams), drops the prefix copies the front drops, and a
dead child ends the engine loop instead of hanging it."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from pathlib import Path

import peft_oracle
import pytest
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import peft_device_prefixes, run_mixed

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig, EngineUnavailable
from server.engine.kv_cache import KVBudgetError
from server.engine.request import SamplingParams
from server.engine.worker import RunnerProcess, RunnerSpec


def spec(model_dir: Path, max_num_seqs: int = 6, **overrides) -> RunnerSpec:
    settings = dict(
        model=str(model_dir),
        device=peft_oracle.DEVICE,  # `pytest --device cuda`: the child serves on the GPU
        dtype="float32",
        max_num_seqs=max_num_seqs,
        max_model_len=1024,
        max_prefix_tokens=256,
        kv_cache_bytes=1 << 30,
        prefix_cache_bytes=0,
        cuda_graphs=True,
        retain_host_memory=False,
    )
    return RunnerSpec(**{**settings, **overrides})


def process_engine(model_dir: Path, max_num_seqs: int = 6, **config) -> Engine:
    """The engine as `prefix-serve --runner-process true` builds it: a weightless backbone in this process."""
    backbone = load_backbone(model_dir, peft_oracle.DEVICE, "float32", weights=False)
    assert backbone.model.device.type == "meta"  # no weights in this process
    runner = RunnerProcess(spec(model_dir, max_num_seqs))
    backbone.rules = runner.rules
    return Engine(backbone, EngineConfig(max_num_seqs=max_num_seqs, **config), runner=runner)


async def collect(engine: Engine, jobs) -> list[list[tuple[int, float | None]]]:
    """Each job's (token id, logprob) pairs, all jobs submitted at once."""

    async def one(prefix, prompt, params):
        request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id if prefix else None)
        return [(o.token_id, o.logprob) async for o in engine.stream(request) if o.token_id is not None]

    return await asyncio.gather(*(one(*job) for job in jobs))


def test_runner_process_gives_peft_tokens_and_the_in_process_samples(peft_case):
    kind, model_dir, adapters, expected = peft_case
    prefixes = peft_device_prefixes(adapters, peft_oracle.DEVICE)
    greedy_jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS):
        for prefix_id in [None, *prefixes]:
            greedy_jobs.append((prefixes.get(prefix_id), prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, i))
    one = next(iter(prefixes.values()))
    other_jobs = [
        (one, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)),
        (None, PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, seed=8, logprobs=2)),
        (one, PROMPTS[2], SamplingParams(max_new_tokens=12, repetition_penalty=1.5, frequency_penalty=0.7)),
        (one, PROMPTS[1], SamplingParams(max_new_tokens=8, num_beams=3)),
        (None, PROMPTS[0], SamplingParams(max_new_tokens=10, logprobs=3)),
    ]
    in_process = Engine(load_backbone(model_dir, peft_oracle.DEVICE, "float32"), EngineConfig(max_num_seqs=6))
    engine = process_engine(model_dir)
    try:
        engine.start()
        got = asyncio.run(run_mixed(engine, greedy_jobs, stagger=True))
        assert got == [expected[prefix_id][i] for prefix_id, i in keys]
        in_process.start()
        got, want = asyncio.run(collect(engine, other_jobs)), asyncio.run(collect(in_process, other_jobs))
        assert [[t for t, _ in job] for job in got] == [[t for t, _ in job] for job in want]
        # logprobs: the same up to float rounding (which rows share a step differs run to run, in a process or not)
        for job_got, job_want in zip(got, want, strict=True):
            for (_, a), (_, b) in zip(job_got, job_want, strict=True):
                assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4)
        assert any(lp is not None for job in got for _, lp in job)
        assert engine.num_steps > 0 and engine.runner.forward_seconds > 0
        # the child's CPU time is counted in the step's (the engine thread's own is the rest)
        assert 0 < engine.runner.cpu_seconds <= engine.step_cpu_seconds
    finally:
        in_process.stop()
        engine.stop()
    assert not engine.runner.process.is_alive()


def test_the_child_drops_a_prefix_copy_when_the_front_drops_the_prefix(peft_case):
    kind, model_dir, adapters, _ = peft_case
    engine = process_engine(model_dir)
    engine.start()
    try:
        prefixes = peft_device_prefixes(adapters)
        jobs = [(p, PROMPTS[0], SamplingParams(max_new_tokens=3)) for p in prefixes.values()] * 2
        asyncio.run(run_mixed(engine, jobs, stagger=False))
        assert engine.runner.held_prefixes() == len(prefixes)  # one copy each, though each ran twice
        del jobs
        prefixes.popitem()
        # the last finished requests (and their prefixes) leave the scheduler at its next step
        run_engine_tokens(engine, 2)
        gc.collect()
        assert engine.runner.held_prefixes() == len(prefixes)
        prefixes.clear()
        gc.collect()
        assert engine.runner.held_prefixes() == 0
    finally:
        engine.stop()


def test_a_killed_child_ends_the_loop_and_fails_what_waits(tiny_gpt2_dir: Path):
    engine = process_engine(tiny_gpt2_dir)
    engine.start()
    try:
        assert run_engine_tokens(engine, 2) and engine.health() is None

        async def kill_mid_generation():
            request = engine.add(
                engine.tokenize("hello"), SamplingParams(max_new_tokens=500, ignore_eos=True)
            )
            outputs = []
            async for output in engine.stream(request):
                outputs.append(output)
                if len(outputs) == 3:
                    os.kill(engine.runner.pid, signal.SIGKILL)
            return outputs

        outputs = asyncio.run(asyncio.wait_for(kill_mid_generation(), 60))
        last = outputs[-1]
        assert last.is_finished and "runner process is gone" in (last.error or ""), last
        assert "RunnerDied" in (engine.loop_error or "") and "runner process is gone" in (
            engine.health() or ""
        )

        async def after():  # refused at once, not left waiting on a dead loop
            engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=2))

        with pytest.raises(EngineUnavailable, match="engine loop died"):
            asyncio.run(after())
    finally:
        engine.stop()


def test_an_idle_engine_reports_a_killed_child_before_any_step(tiny_gpt2_dir: Path):
    engine = process_engine(tiny_gpt2_dir)
    engine.start()
    try:
        os.kill(engine.runner.pid, signal.SIGKILL)
        engine.runner.process.join(10)
        assert "runner process is gone (exit code -9)" in (engine.health() or "")
    finally:
        engine.stop()


def test_a_stopped_child_is_reported_stuck_and_closing_does_not_wait_for_it(tiny_gpt2_dir: Path):
    engine = process_engine(tiny_gpt2_dir, max_step_seconds=0.5)
    engine.start()
    ends: list[str] = []

    def wait_for_tokens() -> None:  # a request whose step hangs in the stopped child, then fails
        async def outputs():
            request = engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=2))
            return [o async for o in engine.stream(request)]

        ends.append(asyncio.run(asyncio.wait_for(outputs(), 60))[-1].error or "")

    waiting = threading.Thread(target=wait_for_tokens)
    try:
        os.kill(engine.runner.pid, signal.SIGSTOP)  # a step that never returns
        waiting.start()
        deadline = time.monotonic() + 20
        while "stuck" not in (engine.health() or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "engine loop stuck" in (engine.health() or "")
        started = time.monotonic()
        engine.runner.close()  # the engine thread holds the pipe, waiting: close kills the child
        assert time.monotonic() - started < 15 and not engine.runner.process.is_alive()
        waiting.join(30)
        assert not waiting.is_alive() and "RunnerDied" in (engine.loop_error or "")
        assert ends and "RunnerDied: the runner process" in ends[0]
    finally:
        engine.stop()


def test_the_child_ignores_ctrl_c_the_front_decides_when_it_stops(tiny_gpt2_dir: Path):
    engine = process_engine(tiny_gpt2_dir)
    engine.start()
    try:
        os.kill(engine.runner.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        os.kill(engine.runner.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert engine.runner.process.is_alive() and run_engine_tokens(engine, 3)
    finally:
        engine.stop()
    assert engine.runner.process.exitcode == 0


def test_a_budget_the_child_cannot_fit_is_refused_at_start_with_its_reason(tiny_gpt2_dir: Path):
    with pytest.raises(KVBudgetError, match="cannot hold one sequence"):
        RunnerProcess(spec(tiny_gpt2_dir, kv_cache_bytes=1))


def run_engine_tokens(engine: Engine, n: int) -> list[int]:
    async def tokens():
        request = engine.add(
            engine.tokenize("hello there"), SamplingParams(max_new_tokens=n, ignore_eos=True)
        )
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    out = asyncio.run(asyncio.wait_for(tokens(), 60))
    assert len(out) == n
    return out
