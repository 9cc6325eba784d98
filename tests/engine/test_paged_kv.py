"""The paged KV layout (`--kv-layout paged`) gives every request what PEFT gives it alone, like the slot cache.

The existing exactness tests are run again with their engines built paged (blocks of 4 positions, so the tiny
prompts and prefixes of 3-12 tokens cross block boundaries and share blocks), and the pool's own accounting says
a prefix used by many concurrent requests is stored once.
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
import test_fault_isolation
import test_llama
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes

from prefix_store.format import Prefix
from server.engine import paged_kernel
from server.engine.backbone import load_backbone
from server.engine.block_pool import BlockPool
from server.engine.engine import Engine, EngineConfig, PromptTooLong
from server.engine.kv_cache import KVBudgetError
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.metrics import _LiveCollector

PAGED = {"kv_layout": "paged", "kv_block_size": 4}


@pytest.fixture
def paged(monkeypatch):
    """Every Engine the exactness test modules build is paged."""
    for module in (test_engine_exactness, test_beam_search, test_fault_isolation):
        monkeypatch.setattr(module, "EngineConfig", functools.partial(EngineConfig, **PAGED))


def test_mixed_batches_match_peft_token_for_token(peft_case, paged):
    test_engine_exactness.test_mixed_batches_match_peft_token_for_token(peft_case)  # BART: test_paged_bart.py


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_beam_search_matches_peft_generate_in_mixed_steps(peft_case, paged):
    test_beam_search.test_beam_search_matches_peft_generate_in_mixed_steps(peft_case)


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_poisoned_rows_fail_alone_and_their_blocks_are_clean_for_the_next(peft_case, paged):
    test_fault_isolation.test_poisoned_rows_fail_alone_and_their_slots_are_clean_for_the_next(
        peft_case, False
    )


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_gpt2_dir: Path, paged):
    test_fault_isolation.test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_gpt2_dir)


def test_finished_and_aborted_rows_leave_their_blocks_to_others(tiny_gpt2_dir: Path, paged):
    test_engine_exactness.test_aborted_and_finished_slots_are_reused_correctly(tiny_gpt2_dir)


@pytest.mark.parametrize("llama_case", ["llama", "qwen2", "mistral"], indirect=True)
def test_llama_mixed_batches_match_peft(llama_case, paged, monkeypatch):
    monkeypatch.setattr(test_llama, "run_engine", test_engine_exactness.run_engine)
    test_llama.test_mixed_batches_match_peft_token_for_token(llama_case)


llama_case = test_llama.llama_case


def _prefixes_gpt2(peft_case):
    kind, model_dir, adapters, expected = peft_case
    return load_backbone(model_dir, "cpu", "float32"), peft_device_prefixes(adapters), expected


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_prefix_used_by_64_concurrent_requests_is_stored_once(peft_case):
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    prefix_id = "t/a3"  # 12 tokens: 3 blocks of 4
    prefix = prefixes[prefix_id]
    engine = Engine(backbone, EngineConfig(max_num_seqs=64, **PAGED))
    pool = engine.runner.block_pool
    seen: list[tuple[int, int, int]] = []
    engine.runner.on_forward = lambda requests: seen.append(
        (len(requests), pool.num_prefix_blocks, pool.references(f"sha256:{prefix.meta.sha256}"))
    )
    collector = _LiveCollector(SimpleNamespace(cache=None, engine=engine))
    jobs = [(prefix, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=MAX_NEW)) for i in range(64)]
    engine.start()
    try:
        results = asyncio.run(test_engine_exactness.run_mixed(engine, jobs, stagger=False))
    finally:
        engine.stop()
    engine.step()  # the finished rows leave (and give their blocks back) at the next step
    metrics = {m.name: m.samples[0].value for m in collector.collect() if m.name.startswith("prefixserve_kv")}
    assert results == [expected[prefix_id][i % len(PROMPTS)] for i in range(64)]
    running, prefix_blocks, references = max(seen)
    assert running == 64 and references == 64 and prefix_blocks == 3  # 64 users, one copy
    assert metrics["prefixserve_kv_blocks_prefixes"] == 3  # resident after they left, for the next one
    assert metrics["prefixserve_kv_blocks_sequences"] == 0
    assert metrics["prefixserve_kv_blocks_free"] == metrics["prefixserve_kv_blocks_total"] - 3


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_evicted_prefixes_are_reloaded_and_a_small_pool_admits_by_blocks(peft_case):
    """A pool of 24 blocks: 4 prefixes (1-3 blocks) and every request's own 3-6 blocks cannot all stay, so
    prefixes are evicted and written again, and requests wait for blocks; every answer is still PEFT's."""
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(
        max_num_seqs=16, max_model_len=64, max_prefix_tokens=16, kv_cache_bytes=25 * per_block, **PAGED
    )
    engine = Engine(backbone, config)
    pool = engine.runner.block_pool
    assert pool.num_usable == 24
    peak: list[int] = []
    engine.runner.on_forward = lambda requests: peak.append(len(requests))
    jobs, keys = [], []
    for _ in range(3):
        for p_index, prompt in enumerate(PROMPTS):
            for prefix_id, prefix in prefixes.items():
                jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
                keys.append((prefix_id, p_index))
    engine.start()
    try:
        results = asyncio.run(test_engine_exactness.run_mixed(engine, jobs, stagger=True))
    finally:
        engine.stop()
    assert results == [expected[k][i] for k, i in keys]
    assert pool.num_evictions > 0 and max(peak) < 16  # blocks, not rows, bounded the batch


def test_what_can_never_fit_the_pool_is_refused_at_the_door(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(max_model_len=32, max_prefix_tokens=8, kv_cache_bytes=12 * per_block, **PAGED)
    engine = Engine(backbone, config)  # 11 usable blocks: a sequence of 32 positions needs 8 or 9
    engine.check_fits(4, 7, 21)
    engine.check_fits(1, 1, 4, num_beams=5)  # 1 + 5 x 2
    with pytest.raises(PromptTooLong, match="KV blocks"):
        engine.check_fits(1, 1, 4, num_beams=6)
    with pytest.raises(KVBudgetError, match="--kv-cache-bytes"):
        Engine(backbone, dataclasses.replace(config, kv_cache_bytes=9 * per_block))


def test_the_start_up_line_says_blocks_and_sequences(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    runner = ModelRunner(backbone, EngineConfig(max_num_seqs=4, max_model_len=64, **PAGED))
    line = runner.kv_plan.describe(4)
    assert "64 blocks of 4 positions" in line and "4 sequences of 64 positions" in line
    assert runner.decode_mode.startswith("eager, --kv-layout paged: blocks")


def random_prefix(backbone, num_tokens: int, seed: int) -> Prefix:
    generator = torch.Generator().manual_seed(seed)
    shape = backbone.shape
    target = torch.randn(
        shape.num_layers, 2, shape.num_heads, num_tokens, shape.head_dim, generator=generator
    )
    return Prefix(model_type="gpt2", targets={"decoder": target})


@pytest.mark.parametrize("read", ["kernel", "gather"])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_any_block_size_equals_the_slot_cache(tiny_gpt2_dir: Path, block_size: int, read: str, monkeypatch):
    """Prefixes of 1-17 tokens, prompts and outputs crossing many blocks: paged tokens == slot tokens, whether
    decode steps read the blocks in place (the CPU kernel) or gather them."""
    if read == "gather":
        monkeypatch.setattr(paged_kernel, "load", lambda: None)
    elif paged_kernel.load() is None:
        pytest.skip("the paged decode kernel cannot be built here (no C++ compiler)")
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    prefixes = [None] + [device_prefix(f"t/r{n}", random_prefix(backbone, n, n)) for n in (1, 4, 5, 17)]
    jobs = [
        (prefix, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=8 + 3 * (i % 5)))
        for i, prefix in enumerate(prefixes * 4)
    ]
    slots, _ = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=6)
    config = functools.partial(EngineConfig, kv_layout="paged", kv_block_size=block_size)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_engine_exactness, "EngineConfig", config)
        paged, _ = test_engine_exactness.run_engine(backbone, jobs, max_num_seqs=6)
    assert paged == slots


@pytest.mark.parametrize("groups", [1, 4])
def test_the_decode_kernel_attends_what_the_gather_and_sdpa_attend(groups: int):
    """Rows with prefixes of 0-9 tokens and own tokens across blocks, 1 or 4 query rows per key/value head."""
    if paged_kernel.load() is None:
        pytest.skip("the paged decode kernel cannot be built here (no C++ compiler)")
    shape = SimpleNamespace(num_layers=1, kv_heads=2, head_dim=8)
    cache = PagedKVCache(shape, 64, 4, 6, 12, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    pool = BlockPool(64, 4)
    lengths = [(0, 1), (3, 4), (4, 9), (9, 2), (1, 30), (7, 13)]  # (P, own tokens written so far)
    for slot, (num_prefix, _) in enumerate(lengths):
        cache.join(slot, pool.admit(slot, f"p{slot}" if num_prefix else None, num_prefix, 32)[0])
    positions = torch.tensor([p + own for p, own in lengths])
    attention = cache.decode_attention(positions, cache.decode_length(positions.numpy()))
    q = torch.randn(len(lengths), 2, groups, 8, generator=torch.Generator().manual_seed(1))
    mask = attention.mask.expand(len(lengths), 1, groups, attention.mask.shape[-1])
    in_place = cache.attend(0, q, attention, mask, 0.3)
    gathered = cache.attend(0, q, dataclasses.replace(attention, rows=None), mask, 0.3)
    torch.testing.assert_close(in_place, gathered, rtol=1e-5, atol=1e-6)


def _tight_engine(backbone, num_blocks: int, max_num_seqs: int = 16, max_model_len: int = 64) -> Engine:
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_prefix_tokens=16,
        kv_cache_bytes=(num_blocks + 1) * per_block,
        **PAGED,
    )
    return Engine(backbone, config)


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_preempted_requests_resume_with_the_tokens_they_would_have_had(peft_case):
    """Blocks are taken as sequences grow: 20 blocks for 25 requests of 12-17 positions (4-5 blocks each) run
    out mid-decode, so running requests are preempted and resumed (their prefill runs prompt + the tokens they
    had); every answer is still PEFT's, and every block comes back."""
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    engine = _tight_engine(backbone, 20)
    pool = engine.runner.block_pool
    jobs, keys = [], []
    for p_index, prompt in enumerate(PROMPTS):
        for prefix_id, prefix in prefixes.items():
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, p_index))
    engine.start()
    try:
        results = asyncio.run(test_engine_exactness.run_mixed(engine, jobs, stagger=False))
    finally:
        engine.stop()
    engine.step()
    assert results == [expected[k][i] for k, i in keys]
    assert engine.scheduler.num_preemptions > 0
    assert pool.num_sequence_blocks == 0 and engine.scheduler.rows.requests.count(None) == 16  # rows back


def test_preempted_sampled_rows_draw_what_they_draw_uninterrupted(tiny_gpt2_dir: Path):
    """Seeded sampling with penalties, preempted and resumed in a tight pool == the same requests in slots."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
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
    engine = _tight_engine(backbone, 14, max_num_seqs=10, max_model_len=40)
    engine.start()
    try:
        paged = asyncio.run(test_engine_exactness.run_mixed(engine, jobs, stagger=False))
    finally:
        engine.stop()
    assert engine.scheduler.num_preemptions > 0
    assert paged == slots
