"""Overlapped steps (EngineConfig.overlap): the engine schedules and sends step k before it records step k-1.

The runner process is the runner that overlaps in the server; here a LaggedRunner runs the real ModelRunner in
this process one step behind (a step runs when its answer is collected, as the child answers in order), so the
bookkeeping is tested without a child: rows that finished run once more and drop their tokens, a left row is
not read as its next occupant's, beam groups wait, and every token is what the engine gives without overlap.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from pathlib import Path

import peft_oracle
import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes, run_mixed
from test_fault_isolation import poisoned

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.step import StepInput, StepOutput


class LaggedRunner:
    """A ModelRunner that takes steps without running them: each runs when its answer is collected."""

    def __init__(self, backbone, config: EngineConfig):
        self.runner = ModelRunner(backbone, config)
        self.kv_plan, self.decode_mode = self.runner.kv_plan, self.runner.decode_mode
        self.sent: deque[StepInput] = deque()
        self.most_in_flight = 0
        self.on_forward = self.runner.on_forward

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, batch: StepInput) -> StepOutput:
        return self.runner.execute(batch)

    def submit(self, batch: StepInput) -> None:
        self.sent.append(batch)
        self.most_in_flight = max(self.most_in_flight, len(self.sent))

    def collect(self) -> StepOutput:
        return self.runner.execute(self.sent.popleft())


def lagged_engine(backbone, max_num_seqs: int = 5, **config_args) -> Engine:
    config = EngineConfig(max_num_seqs=max_num_seqs, **config_args)
    engine = Engine(backbone, config, runner=LaggedRunner(backbone, config))
    assert engine.overlaps
    return engine


def run(engine: Engine, jobs, stagger: bool = True) -> list[list[int]]:
    engine.start()
    try:
        return asyncio.run(run_mixed(engine, jobs, stagger))
    finally:
        engine.stop()


def plain(backbone, jobs, max_num_seqs: int = 5) -> list[list[int]]:
    return run(Engine(backbone, EngineConfig(max_num_seqs=max_num_seqs)), jobs, stagger=False)


def test_overlapped_steps_give_peft_tokens(peft_case):
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, peft_oracle.DEVICE, "float32")
    prefixes = {None: None, **peft_device_prefixes(adapters, peft_oracle.DEVICE)}
    jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS):
        for prefix_id, prefix in prefixes.items():
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, i))
    engine = lagged_engine(backbone, max_num_seqs=4)  # fewer rows than jobs: rows turn over
    got = run(engine, jobs)
    assert got == [expected[prefix_id][i] for prefix_id, i in keys]
    assert engine.runner.most_in_flight == 2 and engine.num_overlapped_steps > 0


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_hostile_tenant_s_poisoned_rows_fail_alone_when_overlapped(peft_case):
    """NaN/Inf prefixes (what the upload check refuses, here straight to the engine) in the same overlapped steps
    as PEFT-parity requests, with few rows so that poisoned rows' rows are taken again by good ones."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    good = peft_device_prefixes(adapters)
    bad = [device_prefix(f"evil/{v}", poisoned(backbone, v)) for v in (float("nan"), float("inf"))]
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS):
        jobs.append((bad[i % 2], prompt, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=3)))
        keys.append(("bad", i))
        for prefix_id, prefix in good.items():
            jobs.append((prefix, prompt, greedy))
            keys.append((prefix_id, i))
    engine = lagged_engine(backbone, max_num_seqs=4)

    async def everything():
        async def one(prefix, prompt, params):
            request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id)
            return [o async for o in engine.stream(request)]

        return await asyncio.gather(*(one(*job) for job in jobs))

    engine.start()
    try:
        outputs = asyncio.run(everything())
    finally:
        engine.stop()
    for (prefix_id, i), outs in zip(keys, outputs, strict=True):
        tokens = [o.token_id for o in outs if o.token_id is not None]
        if prefix_id == "bad":
            assert outs[-1].error_code == "numerical_error" and tokens == []
        else:
            assert tokens == expected[prefix_id][i] and outs[-1].error is None
    assert engine.num_overlapped_steps > 0


def test_rows_that_finish_and_leave_do_not_leak_into_their_next_occupant(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    rng = random.Random(1)
    jobs = [
        (None, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=rng.randint(1, 9), ignore_eos=True))
        for i in range(24)
    ]
    want = plain(backbone, jobs)
    got = run(lagged_engine(backbone), jobs)
    assert got == want
    assert [len(tokens) for tokens in got] == [job[2].max_new_tokens for job in jobs]  # none ran over


def test_sampling_stops_logprobs_and_beams_overlapped(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    first = plain(backbone, [(None, PROMPTS[0], SamplingParams(max_new_tokens=6))])[0]
    jobs = [
        (None, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)),
        (None, PROMPTS[1], SamplingParams(max_new_tokens=12, repetition_penalty=1.5, frequency_penalty=0.7)),
        (None, PROMPTS[0], SamplingParams(max_new_tokens=12, stop_token_ids=(first[2],))),  # stops at its 3rd
        (None, PROMPTS[2], SamplingParams(max_new_tokens=10, logprobs=2)),
        (None, PROMPTS[1], SamplingParams(max_new_tokens=8, num_beams=3)),
        (None, PROMPTS[2], SamplingParams(max_new_tokens=5, min_tokens=5, stop_token_ids=(first[0],))),
    ]
    want = plain(backbone, jobs, max_num_seqs=8)
    assert run(lagged_engine(backbone, max_num_seqs=8), jobs, stagger=False) == want
    assert want[2] == first[:3]


def test_an_abort_mid_flight_frees_the_row(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    engine = lagged_engine(backbone, max_num_seqs=2)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    short = (None, PROMPTS[1], SamplingParams(max_new_tokens=6))

    async def scenario() -> list[list[int]]:
        aborted = engine.add(engine.tokenize(PROMPTS[0]), long)
        stream = engine.stream(aborted)
        await anext(stream)
        engine.abort(aborted.request_id)
        async for _ in stream:
            pass
        got = await run_mixed(engine, [short, short], stagger=False)
        for _ in range(1000):  # finished rows leave at the next step, and the last step's answer is read
            if engine.num_running == 0 and not engine._in_flight:
                break
            await asyncio.sleep(0.01)
        return got

    engine.start()
    try:
        got = asyncio.run(scenario())
    finally:
        engine.stop()
    assert got == plain(backbone, [short, short], max_num_seqs=2)
    assert engine.num_running == 0 and not engine._in_flight


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_paged_rows_grow_preempt_and_resume_when_overlapped(peft_case):
    """--kv-layout paged, 20 blocks of 4: rows take their next block a token early (the step in flight writes
    one more), are preempted with a step in flight (its token recorded, then recomputed on resume) and finish
    while preempted; a hostile tenant's NaN rows fail alone in the same steps. PEFT's tokens for every other."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    paged = dict(kv_layout="paged", kv_block_size=4, kv_cache_bytes=21 * per_block, max_prefix_tokens=16)
    engine = lagged_engine(backbone, max_num_seqs=16, max_model_len=64, **paged)
    nan = device_prefix("evil/nan", poisoned(backbone, float("nan")))
    jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS * 2):
        jobs.append((nan, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
        keys.append(None)
        for prefix_id, prefix in peft_device_prefixes(adapters).items():
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, i % len(PROMPTS)))
    got = run(engine, jobs)
    assert [g for g, k in zip(got, keys, strict=True) if k] == [expected[k[0]][k[1]] for k in keys if k]
    assert [g for g, k in zip(got, keys, strict=True) if k is None] == [[]] * keys.count(None)
    assert engine.scheduler.num_preemptions > 0 and engine.num_overlapped_steps > 0
