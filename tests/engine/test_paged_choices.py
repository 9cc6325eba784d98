"""The n choices of one request (`n` > 1) under the paged KV layout: queued together, admitted together, their
prompt run once and its whole blocks stored once; each choice still gives exactly what it gives alone (greedy,
seeded sampling with penalties and logprobs), across block boundaries, preempted and resumed, and beside a
hostile tenant's huge and poisoned groups."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes
from test_fault_isolation import poisoned
from test_paged_kv import PAGED, random_prefix

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams

# (tokens, logprobs, error code) of one choice
Result = tuple[list[int], list[float | None], str | None]
GREEDY = SamplingParams(max_new_tokens=14)
SAMPLED = SamplingParams(
    max_new_tokens=14,
    temperature=0.9,
    top_p=0.95,
    seed=3,
    repetition_penalty=1.3,
    presence_penalty=0.4,
    logprobs=2,
    min_tokens=4,
)


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """What the OpenAI routes send for n: with a seed, choice i uses seed + i."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


async def _collect(engine: Engine, request) -> Result:
    tokens: list[int] = []
    logprobs: list[float | None] = []
    error = None
    async for output in engine.stream(request):
        error = output.error_code or error
        if output.token_id is not None:
            tokens.append(output.token_id)
            logprobs.append(output.logprob)
    return tokens, logprobs, error


def run_groups(engine: Engine, jobs: list[tuple]) -> list[list[Result]]:
    """jobs: (prefix, prompt token ids, [params per choice], tenant), each queued as one request's choices."""

    async def one(prefix, token_ids, params, tenant) -> list[Result]:
        requests = engine.add_choices(token_ids, params, prefix, prefix.id if prefix else None, tenant)
        return list(await asyncio.gather(*(_collect(engine, r) for r in requests)))

    async def everything() -> list[list[Result]]:
        return list(await asyncio.gather(*(one(*job) for job in jobs)))

    engine.start()
    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def alone(backbone, config: EngineConfig, prefix, token_ids, params: list[SamplingParams]) -> list[Result]:
    """Each choice as a request of its own, one at a time."""
    return [run_groups(Engine(backbone, config), [(prefix, token_ids, [p], None)])[0][0] for p in params]


def tight(backbone, num_blocks: int, **config) -> EngineConfig:
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    return EngineConfig(kv_cache_bytes=(num_blocks + 1) * per_block, max_prefix_tokens=16, **config, **PAGED)


@pytest.mark.parametrize("num_prompt", [8, 9])  # the prompt ends on a block boundary, or inside a block
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_choices_run_the_prompt_once_share_its_blocks_and_give_what_each_gives_alone(
    tiny_gpt2_dir: Path, num_prompt: int, params: SamplingParams
):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    prefix = device_prefix("t/r5", random_prefix(backbone, 5, 5))  # 2 blocks of 4
    token_ids = list(range(11, 11 + num_prompt))
    group = choices(params, 4)
    engine = Engine(backbone, EngineConfig(max_num_seqs=8, **PAGED))
    pool = engine.runner.block_pool
    forwards: list[tuple[int, int]] = []
    engine.runner.on_forward = lambda rs: forwards.append((len(rs), pool.num_sequence_blocks))
    (paged,) = run_groups(engine, [(prefix, token_ids, group, None)])
    # one prefill of one row; the prompt's 2 whole blocks stored once, and each choice's own block after them
    assert forwards[0] == (1, 2 + 4 * 1)
    assert [n for n, _ in forwards[1:]] == [4] * (len(forwards) - 1)  # then the 4 choices decode together
    engine.step()
    assert pool.num_sequence_blocks == 0 and pool.num_prefix_blocks == 2
    # each alone, paged and in slots: the same tokens (logprobs to float32 rounding: a batch of 4 and the
    # paged kernel sum in other orders)
    for config in (EngineConfig(max_num_seqs=8, **PAGED), EngineConfig(max_num_seqs=8)):
        each = alone(backbone, config, prefix, token_ids, group)
        assert [tokens for tokens, _, _ in paged] == [tokens for tokens, _, _ in each]
        torch.testing.assert_close(
            [lp for _, lp, _ in paged], [lp for _, lp, _ in each], rtol=1e-5, atol=1e-5
        )
    first = alone(backbone, EngineConfig(max_num_seqs=8, **PAGED), prefix, token_ids, group)
    assert [lp[0] for _, lp, _ in paged] == [lp[0] for _, lp, _ in first]  # the shared prefill's, bit for bit
    assert all(error is None and len(tokens) > 4 for tokens, _, error in paged)
    if params.seed is not None:
        assert len({tuple(tokens) for tokens, _, _ in paged}) > 1  # each choice its own seed


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_preempted_choice_resumes_with_the_tokens_it_would_have_had(tiny_gpt2_dir: Path, params):
    """16 blocks for 4 choices that grow to 2 shared + 4 x 6 own: choices are preempted mid-decode and resumed
    (prompt + their tokens recomputed into blocks of their own); every choice still gives what it gives alone,
    and every block comes back."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    token_ids = list(range(30, 39))
    group = choices(dataclasses.replace(params, max_new_tokens=20, ignore_eos=True), 4)
    engine = Engine(backbone, tight(backbone, 16, max_num_seqs=8, max_model_len=40))
    (paged,) = run_groups(engine, [(None, token_ids, group, None)])
    engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.block_pool.num_sequence_blocks == 0
    slots = alone(backbone, EngineConfig(max_num_seqs=8), None, token_ids, group)
    assert [tokens for tokens, _, _ in paged] == [tokens for tokens, _, _ in slots]


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_hostile_tenants_huge_and_poisoned_groups_leave_the_others_tokens_alone(peft_case):
    """In the same steps: the others' choices (n 1-3, greedy) over PEFT prefixes, a hostile tenant's 16-choice
    groups (more than the free rows: admitted in parts) and a 4-choice group over a NaN prefix. Every other
    choice is PEFT's; the poisoned choices fail alone (numerical_error)."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    prefixes = peft_device_prefixes(adapters)
    tokenize = functools.partial(Engine.tokenize, Engine(backbone, EngineConfig(max_num_seqs=1)))
    nan = device_prefix("evil/nan", poisoned(backbone, float("nan")))
    huge = device_prefix("evil/huge", random_prefix(backbone, 9, 1))
    wild = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.7, seed=1, repetition_penalty=0.5)
    jobs, keys = [], []
    for p_index, prompt in enumerate(PROMPTS):
        for n, (prefix_id, prefix) in enumerate(prefixes.items()):
            jobs.append(
                (prefix, tokenize(prompt), [SamplingParams(max_new_tokens=MAX_NEW)] * (1 + n % 3), "good")
            )
            keys.append((prefix_id, p_index))
        jobs.append((huge, tokenize(prompt), choices(wild, 16), "evil"))
        jobs.append((nan, tokenize(prompt), choices(wild, 4), "evil"))
    engine = Engine(backbone, EngineConfig(max_num_seqs=16, **PAGED))
    schedule, steps = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]  # type: ignore[method-assign]
    results = run_groups(engine, jobs)
    assert max(len(step.forks) for step in steps) > 1  # choices forked, several of them in a step
    good = [r for r, job in zip(results, jobs, strict=True) if job[3] == "good"]
    for key, got in zip(keys, good, strict=True):
        assert [tokens for tokens, _, _ in got] == [expected[key[0]][key[1]]] * len(got), key
        assert all(error is None for _, _, error in got)
    poisoned_runs = [r for r, job in zip(results, jobs, strict=True) if job[0] is nan]
    assert all(error == "numerical_error" for run in poisoned_runs for _, _, error in run)
    huge_runs = [r for r, job in zip(results, jobs, strict=True) if job[0] is huge]
    assert all(error is None and tokens for run in huge_runs for tokens, _, error in run)
    engine.step()
    assert engine.runner.block_pool.num_sequence_blocks == 0
