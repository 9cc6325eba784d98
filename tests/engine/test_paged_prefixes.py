"""Prefixes in the paged pool (`--kv-layout paged`): one device budget. A prefix's blocks are its only device copy
(the prefix cache keeps a host copy the runner writes from when the prefix enters the pool); an unreferenced
prefix is evicted under pressure and reloaded with the same tokens, a referenced one never is, a replaced one is
served fresh, and a tenant cycling many prefixes takes no other tenant's blocks or tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, run_engine
from test_paged_kv import PAGED, _prefixes_gpt2, _tight_engine, random_prefix

from prefix_store.cache import PrefixCache
from prefix_store.format import Prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.store import make_meta
from server.app import _to_device
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams


def check_prefix_blocks(engine: Engine) -> list[set[str | None]]:
    """Before every forward: each row with a prefix reads the pool's live blocks for it (referenced, so never
    evicted or rewritten under it), holding exactly its prefix's keys and values. Returns each forward's tenants."""
    runner, seen = engine.runner, []
    pool, cache = runner.block_pool, runner.cache

    def on_forward(requests) -> None:
        seen.append({r.tenant for r in requests})
        for request in requests:
            if request.prefix_key is None:
                continue
            slot = runner.batch.slots_of(request.row)[0]
            num_prefix = int(cache.num_prefix[slot])
            num_blocks = (int(cache.shift[slot]) + num_prefix) // cache.block_size
            table = cache.tables[slot, :num_blocks].tolist()
            assert pool.references(request.prefix_key) > 0
            assert table == pool.prefix_blocks(request.prefix_key)
            written = cache.kv[:, :, table].flatten(2, 3)[:, :, :num_prefix]  # [L, 2, P, H, d]
            assert torch.equal(written, request.prefix.targets["decoder"].transpose(2, 3))

    runner.on_forward = on_forward
    return seen


async def run_tenants(engine: Engine, jobs: list[tuple[str, object, str, SamplingParams]]) -> list[list[int]]:
    """Jobs (tenant, prefix, prompt, params) submitted interleaved, some while others are mid-flight."""

    async def one(index: int, tenant: str, prefix, prompt: str, params: SamplingParams) -> list[int]:
        await asyncio.sleep(0.002 * (index % 5))
        request = engine.add(
            engine.tokenize(prompt), params, prefix, prefix.id if prefix else None, tenant=tenant
        )
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_hostile_tenant_cycling_prefixes_takes_no_referenced_blocks_and_no_tokens(peft_case):
    """Two tenants run PEFT prefixes while a third cycles 10 distinct prefixes of 13-16 tokens, three times,
    through a pool of 40 blocks that holds a few at a time: its prefixes evict each other and are written again
    (same tokens as the slot cache), the others' referenced blocks are never taken, their tokens are PEFT's."""
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    hostile = [device_prefix(f"h/p{i}", random_prefix(backbone, 13 + i % 4, 100 + i)) for i in range(10)]
    params = SamplingParams(max_new_tokens=MAX_NEW)
    jobs, want = [], []
    for round_ in range(3):
        for i, prompt in enumerate(PROMPTS):
            for tenant, prefix_id in (("alice", "t/a3"), ("bob", "t/a2")):
                jobs.append((tenant, prefixes[prefix_id], prompt, params))
                want.append(expected[prefix_id][i])
            for prefix in hostile[2 * i : 2 * i + 2]:
                jobs.append(("mallory", prefix, PROMPTS[round_], params))
                want.append(None)
    slots, _ = run_engine(backbone, [job[1:] for job in jobs], max_num_seqs=8)
    want = [w if w is not None else s for w, s in zip(want, slots, strict=True)]
    engine = _tight_engine(backbone, 40, max_num_seqs=8)
    pool = engine.runner.block_pool
    seen = check_prefix_blocks(engine)
    engine.start()
    try:
        results = asyncio.run(run_tenants(engine, jobs))
    finally:
        engine.stop()
    assert results == want
    assert pool.num_evictions > 0 and pool.num_prefix_loads > 2 + len(hostile)  # evicted ones were reloaded
    assert sum({"alice", "mallory"} <= tenants for tenants in seen) > 5  # the cycling ran beside them


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_prefix_resident_in_the_pool_is_not_copied_again_and_evicted_ones_are(peft_case):
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    num_positions = len(backbone.tokenizer(PROMPTS[1])["input_ids"]) + MAX_NEW
    own = -(-num_positions // 4)
    # t/a3 (3 blocks) and a request's own fit; t/a2 (2) beside them does not: its request evicts t/a3 as it grows
    engine = _tight_engine(backbone, own + 3, max_num_seqs=4, max_model_len=4 * own + 8)
    pool = engine.runner.block_pool
    check_prefix_blocks(engine)
    params = SamplingParams(max_new_tokens=MAX_NEW)

    def run(prefix_id: str) -> None:
        got = asyncio.run(run_tenants(engine, [("t", prefixes[prefix_id], PROMPTS[1], params)]))
        assert got == [expected[prefix_id][1]]

    engine.start()
    try:
        run("t/a3")
        run("t/a3")
        assert (pool.num_prefix_loads, pool.num_prefix_hits) == (1, 1)
        run("t/a2")  # evicts t/a3 (nobody references it) for its prompt's blocks
        run("t/a3")
    finally:
        engine.stop()
    assert pool.num_evictions >= 1 and (pool.num_prefix_loads, pool.num_prefix_hits) == (3, 1)


def test_the_prefix_cache_keeps_pooled_targets_on_the_host():
    """What the server's prefix cache loads under paged: the pooled target (decoder) stays on the host, the
    blocks are its device copy; any other target (and everything with slots) goes to the device."""
    prefix = Prefix("bart", {name: torch.ones(1, 2, 1, 3, 4) for name in ("encoder", "decoder", "cross")})
    device = torch.device("meta")  # stands in for an accelerator: anything not on the host shows
    paged = _to_device(prefix, device, torch.float16, frozenset({"decoder"}))
    assert paged["decoder"].device.type == "cpu" and paged["decoder"].dtype == torch.float16
    assert paged["encoder"].device == device and paged["cross"].device == device
    assert all(t.device == device for t in _to_device(prefix, device, torch.float16).values())


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_a_replaced_prefix_is_served_fresh_beside_its_old_version_s_blocks(peft_case, tmp_path: Path):
    """t/x holds adapter a1's values, then a3's: requests that acquired the old version finish with it, every
    later one gets the new one from its own blocks (keyed by content), never the old blocks."""
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    store = LocalStore(tmp_path)
    engine = Engine(
        backbone, EngineConfig(max_num_seqs=8, **PAGED), release_prefix=lambda p: cache.release(p)
    )
    pooled = engine.runner.pooled_targets
    cache = PrefixCache(store, lambda p: _to_device(p, backbone.device, backbone.dtype, pooled), 1 << 20)
    pool = engine.runner.block_pool

    def put(source_id: str) -> None:
        prefix = Prefix("gpt2", prefixes[source_id].targets)
        data = save_prefix(prefix)
        store.put(make_meta("t/x", prefix, data, "native", False), data)
        cache.invalidate("t/x")

    params = SamplingParams(max_new_tokens=MAX_NEW)
    put("t/a1")
    old = [cache.acquire("t/x") for _ in PROMPTS]
    put("t/a3")
    new = [cache.acquire("t/x") for _ in PROMPTS]
    jobs = [("t", p, prompt, params) for p, prompt in zip(old + new, PROMPTS + PROMPTS, strict=True)]
    engine.start()
    try:
        results = asyncio.run(run_tenants(engine, jobs))
        assert results == expected["t/a1"] + expected["t/a3"]
        assert pool.num_resident_prefixes == 2 and pool.num_prefix_loads == 2
        again = asyncio.run(run_tenants(engine, [("t", cache.acquire("t/x"), PROMPTS[0], params)]))
    finally:
        engine.stop()
    assert again == [expected["t/a3"][0]] and pool.num_prefix_loads == 2  # the new version's blocks, reused
    assert old[0].meta.sha256 != new[0].meta.sha256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_on_cuda_a_paged_prefix_is_on_the_device_only_as_blocks(peft_case, tmp_path: Path):
    """Loading prefixes into the server's cache allocates no device memory (pinned host copies); the pool's
    blocks are written from them, and every answer is PEFT's on the same device."""
    from peft_oracle import peft_generate

    kind, model_dir, adapters, _ = peft_case
    backbone = load_backbone(model_dir, "cuda", "float32")
    engine = Engine(
        backbone, EngineConfig(max_num_seqs=8, **PAGED), release_prefix=lambda p: cache.release(p)
    )
    pooled = engine.runner.pooled_targets
    store = LocalStore(tmp_path)
    cache = PrefixCache(store, lambda p: _to_device(p, backbone.device, backbone.dtype, pooled), 1 << 20)
    for prefix_id, prefix in _prefixes_gpt2(peft_case)[1].items():
        data = save_prefix(Prefix("gpt2", prefix.targets))
        store.put(make_meta(prefix_id, Prefix("gpt2", prefix.targets), data, "native", False), data)
    before = torch.cuda.memory_allocated()
    acquired = {prefix_id: cache.acquire(prefix_id) for prefix_id in adapters}
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(p.targets["decoder"].is_pinned() for p in acquired.values())
    jobs, want = [], []
    for prefix_id, path in adapters.items():
        oracle = peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW, device="cuda")
        for prompt, ids in zip(PROMPTS, oracle, strict=True):
            jobs.append(("t", acquired[prefix_id], prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            want.append(ids)
    engine.start()
    try:
        results = asyncio.run(run_tenants(engine, jobs))
    finally:
        engine.stop()
    assert results == want and engine.runner.block_pool.num_prefix_loads == len(adapters)
