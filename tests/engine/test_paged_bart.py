"""BART under `--kv-layout paged`: the decoder's self-attention entries and the cross entries ([cross prefix |
encoder K/V]) live in the block pool, and every request still gets what PEFT gives it alone.

Blocks of 4 positions (3 and 1 and 16 in the slot-equality test), so the tiny sources, prefixes (3-12 tokens) and
outputs cross block boundaries; tight pools force preemption, whose resumed requests encode their source again
and run their generated tokens through the decoder again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_beam_search
import test_engine_exactness
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes, random_native, run_mixed

from prefix_store.format import Prefix
from server.engine import paged_kernel
from server.engine.backbone import load_backbone
from server.engine.block_pool import BlockPool
from server.engine.engine import Engine, EngineConfig, PromptTooLong
from server.engine.kv_cache import KVBudgetError
from server.engine.paged_cache import PagedKVCache, split_encoder_decoder
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.metrics import _LiveCollector

PAGED = {"kv_layout": "paged", "kv_block_size": 4}
bart = pytest.mark.parametrize("peft_case", ["bart"], indirect=True)


def _run(engine: Engine, jobs) -> list[list[int]]:
    engine.start()
    try:
        return asyncio.run(run_mixed(engine, jobs, stagger=False))
    finally:
        engine.stop()


def _tight_engine(backbone, num_blocks: int, max_num_seqs: int = 16, max_model_len: int = 40) -> Engine:
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_prefix_tokens=16,
        kv_cache_bytes=(num_blocks + 1) * per_block,
        **PAGED,
    )
    return Engine(backbone, config)


def peft_jobs(prefixes, repeats: int = 1):
    jobs, keys = [], []
    for _ in range(repeats):
        for p_index, prompt in enumerate(PROMPTS):
            for prefix_id, prefix in prefixes.items():
                jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
                keys.append((prefix_id, p_index))
    return jobs, keys


def test_a_grant_splits_into_a_decoder_table_and_a_cross_table():
    """Prefix [decoder 5 -> 2 blocks | cross 3 -> 1 block], own [source 6 -> 2 blocks | start token + 2 -> 1]."""
    pool = BlockPool(32, 4, is_encoder_decoder=True)
    num_prefix, num_own = pool.prefix_tokens(5, 3), pool.num_own_prompt(6) + 2
    assert (num_prefix, num_own) == (8 + 3, 8 + 1 + 2)
    (grant,) = pool.admit(0, "p", num_prefix, num_own)
    prefix, own = grant.table[:3], grant.table[3:]
    assert len(own) == 3 and pool.num_prefix_blocks == 3 and pool.num_sequence_blocks == 3
    decoder, cross = split_encoder_decoder(grant, 4, 6, 5, 3)
    assert (decoder.table, decoder.num_prefix_blocks, decoder.num_prefix_tokens) == (
        prefix[:2] + own[2:],
        2,
        5,
    )
    assert (cross.table, cross.num_prefix_blocks, cross.num_prefix_tokens) == (prefix[2:] + own[:2], 1, 3)
    # a prefix with cross entries only: no decoder part
    (grant,) = pool.admit(1, "q", pool.prefix_tokens(0, 3), num_own)
    decoder, cross = split_encoder_decoder(grant, 4, 6, 0, 3)
    assert decoder.num_prefix_blocks == 0 and cross.table == grant.table[:1] + grant.table[1:3]


@bart
def test_mixed_batches_match_peft_token_for_token(peft_case, monkeypatch):
    """Prefixes of 3-12 tokens and none, interleaved in every step: PEFT's greedy tokens."""
    monkeypatch.setattr(test_engine_exactness, "EngineConfig", functools.partial(EngineConfig, **PAGED))
    test_engine_exactness.test_mixed_batches_match_peft_token_for_token(peft_case)


@bart
def test_beam_search_matches_peft_generate_in_mixed_steps(peft_case, monkeypatch):
    monkeypatch.setattr(test_beam_search, "EngineConfig", functools.partial(EngineConfig, **PAGED))
    test_beam_search.test_beam_search_matches_peft_generate_in_mixed_steps(peft_case)


@pytest.mark.parametrize("read", ["kernel", "gather"])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_native_prefixes_and_any_block_size_equal_the_slot_cache(
    tiny_bart_dir: Path, block_size: int, read: str, monkeypatch
):
    """Native prefixes with every target, a decoder and a cross prefix of different lengths, cross only and
    encoder only, next to none: paged tokens == slot tokens, whether decode steps read the blocks in place (the
    CPU kernel, also for the cross entries) or gather them."""
    if read == "gather":
        monkeypatch.setattr(paged_kernel, "load", lambda: None)
    elif paged_kernel.load() is None:
        pytest.skip("the paged decode kernel cannot be built here (no C++ compiler)")
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    natives = [
        random_native("bart", backbone, {"encoder": n, "decoder": n, "cross": n}, seed=n) for n in (1, 4, 7)
    ] + [
        random_native("bart", backbone, {"decoder": 5, "cross": 3}, seed=5),
        random_native("bart", backbone, {"cross": 6}, seed=99),
        random_native("bart", backbone, {"encoder": 6}, seed=98),
    ]
    prefixes = [None] + [device_prefix(f"t/n{i}", p) for i, p in enumerate(natives)]
    jobs = [
        (prefix, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=6 + 3 * (i % 4)))
        for i, prefix in enumerate(prefixes * 3)
    ]
    slots, _ = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=6)
    config = functools.partial(EngineConfig, kv_layout="paged", kv_block_size=block_size)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_engine_exactness, "EngineConfig", config)
        paged, distinct = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=6)
    assert paged == slots
    assert max(distinct) >= 4  # several prefixes in one step


@bart
def test_a_prefix_used_by_many_concurrent_requests_is_stored_once(peft_case):
    """32 requests of one 12-token PEFT prefix (decoder entries only: 3 blocks of 4) run at once; the pool holds
    it once, and every running request's cross entries (its source) are blocks of the same pool."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    prefix = peft_device_prefixes(adapters)["t/a3"]
    engine = Engine(backbone, EngineConfig(max_num_seqs=32, **PAGED))
    pool = engine.runner.block_pool
    seen: list[tuple[int, int, int, int, int]] = []

    def on_forward(requests) -> None:
        source = sum(pool.blocks_for(len(r.prompt_token_ids)) for r in requests)
        refs = pool.references(f"sha256:{prefix.meta.sha256}")
        # each request's own blocks: its source's, and at least one for its decoder
        seen.append((len(requests), pool.num_prefix_blocks, refs, pool.num_sequence_blocks, source))

    engine.runner.on_forward = on_forward
    collector = _LiveCollector(SimpleNamespace(cache=None, engine=engine))
    jobs = [(prefix, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=MAX_NEW)) for i in range(32)]
    results = _run(engine, jobs)
    engine.step()  # the finished rows leave (and give their blocks back) at the next step
    metrics = {m.name: m.samples[0].value for m in collector.collect() if m.name.startswith("prefixserve_kv")}
    assert results == [expected["t/a3"][i % len(PROMPTS)] for i in range(32)]
    running, prefix_blocks, references, sequence_blocks, source = max(seen)
    assert running == 32 and references == 32 and prefix_blocks == 3  # 32 users, one copy
    assert sequence_blocks >= source + running
    assert metrics["prefixserve_kv_blocks_prefixes"] == 3
    assert metrics["prefixserve_kv_blocks_sequences"] == 0
    assert metrics["prefixserve_kv_blocks_free"] == metrics["prefixserve_kv_blocks_total"] - 3


def test_a_beam_group_reads_one_copy_of_its_cross_entries(tiny_bart_dir: Path):
    """A 4-beam group holds its prefix (decoder and cross parts) and its source's cross entries once; each beam
    owns only its decoder blocks."""
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    prefix = device_prefix("t/n", random_native("bart", backbone, {"decoder": 5, "cross": 3}, seed=1))
    engine = Engine(backbone, EngineConfig(max_num_seqs=4, max_model_len=64, max_prefix_tokens=16, **PAGED))
    pool = engine.runner.block_pool
    seen: list[tuple[int, int]] = []
    engine.runner.on_forward = lambda requests: seen.append(
        (pool.num_prefix_blocks, pool.num_sequence_blocks)
    )
    params = SamplingParams(max_new_tokens=12, num_beams=4)
    source = engine.tokenize(PROMPTS[1])
    (beams,) = _run(engine, [(prefix, PROMPTS[1], params)])
    assert beams == test_beam_search.run_jobs(backbone, [(prefix, PROMPTS[1], params)], max_num_seqs=4)[0][0]
    # prefix: 2 decoder blocks + 1 cross block; own: the source's blocks once, 4 x (start token + 12) decoder
    assert set(seen) == {(2 + 1, pool.blocks_for(len(source)) + 4 * pool.blocks_for(1 + 12))}


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_bart_dir: Path):
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    seeded = (None, "hello there", SamplingParams(max_new_tokens=16, temperature=1.1, top_p=0.95, seed=77))
    config = functools.partial(EngineConfig, **PAGED)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_engine_exactness, "EngineConfig", config)
        alone = test_engine_exactness.run_engine(backbone, [seeded], max_num_seqs=1, stagger=False)[0][0]
        others = [
            (
                None,
                PROMPTS[i % len(PROMPTS)],
                SamplingParams(max_new_tokens=10 + i, temperature=0.5 * (i % 3), seed=i),
            )
            for i in range(9)
        ]
        for position in (0, 4, 9):
            jobs = [*others[:position], seeded, *others[position:]]
            batched = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=6)[0]
            assert batched[position] == alone
    assert len(alone) > 2


@bart
def test_preempted_requests_resume_with_the_tokens_they_would_have_had(peft_case, monkeypatch):
    """26 blocks for 25 requests whose sources and decoders need 3-8 each: running requests are preempted as
    they grow, and resumed (source encoded again, start token + generated tokens run through the decoder
    again); every answer is still PEFT's, and every block comes back."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    resumed: list[int] = []
    original = backbone.prefill_decoder

    def recording(cache, start, token_lists, prefix_lens, cross_lens):
        resumed.extend(len(tokens) for tokens in token_lists)
        original(cache, start, token_lists, prefix_lens, cross_lens)

    monkeypatch.setattr(backbone, "prefill_decoder", recording)
    engine = _tight_engine(backbone, 26)
    pool = engine.runner.block_pool
    jobs, keys = peft_jobs(peft_device_prefixes(adapters))
    results = _run(engine, jobs)
    engine.step()
    assert results == [expected[k][i] for k, i in keys]
    assert engine.scheduler.num_preemptions > 0 and max(resumed) >= 2
    assert pool.num_sequence_blocks == 0 and engine.scheduler.rows.requests.count(None) == 16  # rows back


def test_preempted_sampled_rows_draw_what_they_draw_uninterrupted(tiny_bart_dir: Path):
    """Seeded sampling with penalties and min_tokens, preempted and resumed in a tight pool == the slot cache."""
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    jobs = [
        (
            None,
            PROMPTS[i % len(PROMPTS)],
            SamplingParams(
                max_new_tokens=14, temperature=0.9, top_p=0.95, seed=i, repetition_penalty=1.3, min_tokens=6
            ),
        )
        for i in range(10)
    ]
    slots, _ = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=10, stagger=False)
    engine = _tight_engine(backbone, 24, max_num_seqs=10)
    paged = _run(engine, jobs)
    assert engine.scheduler.num_preemptions > 0
    assert paged == slots


def poisoned(backbone, value: float, targets: tuple[str, ...], num_tokens: int = 4) -> Prefix:
    """A BART prefix the upload check would refuse (NaN, Inf in `targets`): here it goes straight to the engine."""
    shape = backbone.shape
    tensors = {}
    for name in ("encoder", "decoder", "cross"):
        tensors[name] = torch.randn(shape.num_layers, 2, shape.kv_heads, num_tokens, shape.head_dim)
        if name in targets:
            tensors[name][:, :, :, 0] = value
    return Prefix("bart", tensors)


@bart
def test_poisoned_rows_fail_alone_and_their_blocks_are_clean_for_the_next(peft_case):
    """A hostile tenant's NaN/Inf prefixes (in the decoder, the cross or the encoder entries) in the same steps as
    PEFT-parity requests, in a pool small enough that their blocks are handed to others: they fail alone."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    good = peft_device_prefixes(adapters)
    bad = [
        device_prefix(f"evil/{i}", poisoned(backbone, value, targets))
        for i, (value, targets) in enumerate(
            [(float("nan"), ("decoder",)), (float("inf"), ("cross",)), (float("nan"), ("encoder",))]
        )
    ]
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=3)
    jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS):
        jobs.append((bad[i % 3], prompt, sampled if i % 2 else greedy))
        keys.append(("bad", i))
        for prefix_id, prefix in good.items():
            jobs.append((prefix, prompt, greedy))
            keys.append((prefix_id, i))
    engine = _tight_engine(backbone, 40, max_num_seqs=6)

    async def one(prefix, prompt, params):
        request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id)
        return [o async for o in engine.stream(request)]

    async def everything():
        return await asyncio.gather(*(one(*job) for job in jobs))

    engine.start()
    try:
        outputs = asyncio.run(everything())
    finally:
        engine.stop()
    for (prefix_id, i), outs in zip(keys, outputs, strict=True):
        tokens = [o.token_id for o in outs if o.token_id is not None]
        if prefix_id == "bad":
            assert outs[-1].error_code == "numerical_error" and outs[-1].finish_reason == "error"
            assert tokens == []
        else:
            assert tokens == expected[prefix_id][i], (prefix_id, PROMPTS[i])
            assert outs[-1].error is None


def test_the_start_up_line_and_the_budget_count_the_cross_entries(tiny_bart_dir: Path):
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    runner = ModelRunner(backbone, EngineConfig(max_num_seqs=4, max_model_len=64, **PAGED))
    line = runner.kv_plan.describe(4)
    # without a budget: 4 sequences of 64 source + 64 decoder positions (16 + 16 blocks each)
    assert "128 blocks of 4 positions" in line and "4 sequences of 64 source + 64 decoder positions" in line
    assert "the sources' cross entries" in line
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(max_model_len=32, max_prefix_tokens=8, kv_cache_bytes=20 * per_block, **PAGED)
    engine = Engine(backbone, config)  # 19 usable: a source of 32 (8 blocks) and a decoder of 32 (8)
    assert engine.runner.cache.num_bytes <= 20 * per_block
    engine.check_fits(32, 4, 28)  # prefix 1 + 1 blocks (counted with cross entries) + 8 + 8
    with pytest.raises(PromptTooLong, match="KV blocks"):
        engine.check_fits(32, 4, 28, num_beams=2)
    with pytest.raises(KVBudgetError, match="and a source of as many"):
        Engine(backbone, dataclasses.replace(config, kv_cache_bytes=18 * per_block))
