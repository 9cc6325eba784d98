"""`--kv-layout paged` with `--runner-process`: the front's block pool allots every block, the child's tensors
follow the grants each step carries, and every request gets what it gets in one process (PEFT's greedy tokens;
seeded samples, beams and choices as the in-process engine gives them) — across block boundaries, with prefixes
evicted and written again, rows preempted and resumed, choices sharing their prompt, and BART's cross entries;
with steps overlapped (the front schedules step k+1 while the child runs step k) and not.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes
from test_fault_isolation import poisoned
from test_overlap import run
from test_paged_bart import peft_jobs
from test_paged_choices import GREEDY, SAMPLED, alone, choices, run_groups
from test_paged_kv import PAGED, random_prefix
from test_runner_process import spec

from server.engine.backbone import load_backbone
from server.engine.block_pool import BlockPool
from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams
from server.engine.step import StepMessage
from server.engine.worker import RunnerProcess

overlap = pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "in-turn"])


def paged_process_engine(
    model_dir: Path,
    overlap: bool,
    num_blocks: int | None = None,
    max_num_seqs: int = 16,
    max_model_len: int = 64,
    **config,
) -> Engine:
    """The engine as `prefix-serve --kv-layout paged --runner-process true` builds it; `num_blocks`: a pool of
    that many usable blocks of 4 positions (else as many as max_num_seqs full sequences)."""
    backbone = load_backbone(model_dir, "cpu", "float32", weights=False)
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    if num_blocks is None:  # what the in-process engine takes without a budget: max_num_seqs full sequences
        parts = 2 if backbone.spec.is_encoder_decoder else 1
        num_blocks = max_num_seqs * parts * -(-max_model_len // 4)
    budget = (num_blocks + 1) * per_block
    limits = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_prefix_tokens=16)
    runner = RunnerProcess(spec(model_dir, kv_cache_bytes=budget, **limits, **PAGED))
    backbone.rules = runner.rules
    engine = Engine(backbone, EngineConfig(**limits, overlap=overlap, **PAGED, **config), runner=runner)
    assert isinstance(engine.scheduler.blocks, BlockPool) and engine.scheduler.blocks is runner.block_pool
    assert engine.overlaps == overlap
    return engine


def record_messages(runner: RunnerProcess) -> list[StepMessage]:
    """The StepMessages the front sends the child, as it sends them."""
    sent: list[StepMessage] = []
    send = runner._conn.send

    def recording(message) -> None:
        if isinstance(message, StepMessage):
            sent.append(message)
        send(message)

    runner._conn.send = recording  # type: ignore[method-assign]
    return sent


@overlap
def test_mixed_batches_give_peft_tokens_and_the_in_process_samples_and_beams(peft_case, overlap):
    """Prefixes of 3-12 tokens and none interleaved in every step (blocks of 4: prompts, prefixes and outputs
    cross block boundaries): PEFT's greedy tokens; each prefix written into the pool once; seeded samples and a
    beam group as the in-process paged engine gives them; every block back at the end."""
    kind, model_dir, adapters, expected = peft_case
    prefixes = peft_device_prefixes(adapters)
    jobs, keys = peft_jobs({None: None, **prefixes}, repeats=2)
    one = next(iter(prefixes.values()))
    others = [
        (one, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)),
        (
            None,
            PROMPTS[1],
            SamplingParams(max_new_tokens=12, temperature=1.3, repetition_penalty=1.4, seed=8),
        ),
        (one, PROMPTS[1], SamplingParams(max_new_tokens=8, num_beams=3)),
    ]
    engine = paged_process_engine(model_dir, overlap)
    pool = engine.scheduler.blocks
    sent = record_messages(engine.runner)
    got = run(engine, jobs + others)
    # a steady step (nobody joins, leaves or is preempted) names only the rows that crossed into a block
    steady = [m for m in sent if not (m.joining or m.leaving or m.preempted or m.forgotten)]
    empty = len(pickle.dumps(StepMessage([], [], [])))
    assert steady and all(len(blocks) == 1 for m in steady for blocks in m.grown.values())
    assert all(len(pickle.dumps(m)) <= empty + 16 * len(m.grown) for m in steady)
    assert got[: len(jobs)] == [expected[prefix_id][i] for prefix_id, i in keys]
    assert pool.num_prefix_loads == len(prefixes) and pool.num_prefix_hits > 0  # written once each
    in_process = Engine(load_backbone(model_dir, "cpu", "float32"), EngineConfig(max_num_seqs=16, **PAGED))
    assert got[len(jobs) :] == run(in_process, others)
    if overlap:
        assert engine.num_overlapped_steps > 0
    engine.scheduler.schedule()  # the last rows leave (the child is stopped: the front alone)
    assert pool.num_sequence_blocks == 0


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
@overlap
def test_a_tight_pool_preempts_evicts_and_reuses_a_poisoned_rows_blocks(peft_case, overlap):
    """20 blocks for requests of 4-5 blocks each and 4 prefixes of 1-3 blocks: rows are preempted and resumed,
    prefixes evicted and written again into blocks others held, and a hostile tenant's NaN prefix fails its
    rows alone in the same steps (the blocks it wrote are zeroed before their next owner reads them). Every
    other answer is PEFT's, and every block comes back."""
    kind, model_dir, adapters, expected = peft_case
    engine = paged_process_engine(model_dir, overlap, num_blocks=20)
    pool = engine.scheduler.blocks
    backbone = load_backbone(model_dir, "cpu", "float32", weights=False)
    nan = device_prefix("evil/nan", poisoned(backbone, float("nan")))
    jobs, keys = peft_jobs(peft_device_prefixes(adapters), repeats=2)
    for i in range(0, len(jobs), 6):
        jobs.insert(i, (nan, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=MAX_NEW)))
        keys.insert(i, None)
    got = run(engine, jobs)
    assert [g for g, k in zip(got, keys, strict=True) if k is None] == [[]] * keys.count(None)
    assert [g for g, k in zip(got, keys, strict=True) if k] == [expected[k[0]][k[1]] for k in keys if k]
    assert engine.scheduler.num_preemptions > 0 and pool.num_evictions > 0
    engine.scheduler.schedule()
    assert pool.num_sequence_blocks == 0 and engine.scheduler.rows.requests.count(None) == len(
        engine.scheduler.rows.requests
    )


@overlap
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_choices_share_their_prompt_and_a_preempted_one_resumes(tiny_gpt2_dir: Path, overlap, params):
    """n = 4 over a prefix, the prompt ending inside a block: the prompt runs once and its whole blocks are
    shared; in a pool of 18 blocks the choices grow into preemption and resume. Each choice gives what it gives
    alone (seeded: choice i with seed + i)."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    prefix = device_prefix("t/r5", random_prefix(backbone, 5, 5))  # 2 blocks of 4
    token_ids = list(range(30, 39))
    group = choices(dataclasses.replace(params, max_new_tokens=20, ignore_eos=True), 4)
    engine = paged_process_engine(tiny_gpt2_dir, overlap, num_blocks=18, max_num_seqs=8, max_model_len=40)
    schedule, steps = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]  # type: ignore[method-assign]
    (paged,) = run_groups(engine, [(prefix, token_ids, group, None)])
    assert max(len(step.forks) for step in steps) == 3  # one prefill, three forks
    assert engine.scheduler.num_preemptions > 0
    engine.scheduler.schedule()
    assert engine.scheduler.blocks.num_sequence_blocks == 0
    each = alone(backbone, EngineConfig(max_num_seqs=8), prefix, token_ids, group)
    assert [tokens for tokens, _, _ in paged] == [tokens for tokens, _, _ in each]
    assert all(error is None for _, _, error in paged)


@pytest.mark.parametrize("peft_case", ["bart"], indirect=True)
@overlap
def test_bart_preempted_rows_and_evicted_prefixes_give_peft_tokens(peft_case, overlap):
    """BART in a pool of 26 blocks: sources' cross entries and decoders grow into preemption (a resumed row's
    source encoded again in the child), prefixes are evicted and written again; PEFT's tokens, blocks back."""
    kind, model_dir, adapters, expected = peft_case
    engine = paged_process_engine(model_dir, overlap, num_blocks=26, max_model_len=40)
    pool = engine.scheduler.blocks
    jobs, keys = peft_jobs(peft_device_prefixes(adapters), repeats=2)
    got = run(engine, jobs, stagger=False)
    assert got == [expected[k][i] for k, i in keys]
    assert engine.scheduler.num_preemptions > 0
    engine.scheduler.schedule()
    assert pool.num_sequence_blocks == 0
