"""Paged decode steps as CUDA graphs replay them (cuda_graphs.py PagedDecodeGraphs): rows padded to the row
buckets, keys to the length bucket, block tables / P / shift in fixed buffers filled in place.

On CPU the runner builds the same graphs uncaptured (test_cuda_graphs.padded_engine), with the paged kernel off
where a test compares against the gather path: the padded static-buffer steps give PEFT's tokens and the eager
paged path's, with rows joining and leaving (bucket changes), preemption, and a hostile tenant in the same steps;
the captured region neither waits on the device nor copies from the host, and a pad row writes only the scratch
block. The last test captures and replays on CUDA (skipped without one).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
import test_beam_search
import test_cuda_graphs
import test_fault_isolation
import test_llama
import test_paged_kv
import torch
from peft_oracle import MAX_NEW, PROMPTS, peft_generate
from test_cuda_graphs import padded_engine
from test_engine_exactness import device_prefix, peft_device_prefixes, run_mixed
from test_fault_isolation import count_host_syncs, poisoned
from test_forward_no_host_wait import HostWaits
from test_paged_kv import PAGED, _prefixes_gpt2, _tight_engine, random_prefix

from server.engine import cuda_graphs, paged_cache, paged_kernel
from server.engine.backbone import load_backbone
from server.engine.cuda_graphs import LENGTH_STEP, PagedDecodeGraphs
from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams

llama_case = test_llama.llama_case


@pytest.fixture
def paged_graphs(monkeypatch):
    """The shared exactness tests' engines are paged; padded_engine builds the paged graphs; eager steps gather."""
    config = functools.partial(EngineConfig, **PAGED)
    for module in (test_cuda_graphs, test_fault_isolation):
        monkeypatch.setattr(module, "EngineConfig", config)
    monkeypatch.setattr(paged_kernel, "load", lambda: None)


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_padded_paged_decode_is_exact_with_sequences_joining_and_leaving(peft_case, paged_graphs):
    test_cuda_graphs.test_padded_decode_is_exact_with_sequences_joining_and_leaving(peft_case)


def test_padded_paged_decode_is_exact_on_the_llama_family(llama_case, paged_graphs):
    test_cuda_graphs.test_padded_decode_is_exact_with_sequences_joining_and_leaving(llama_case)


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_poisoned_rows_fail_alone_next_to_pad_rows(peft_case, paged_graphs):
    test_fault_isolation.test_poisoned_rows_fail_alone_and_their_slots_are_clean_for_the_next(peft_case, True)


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_beam_groups_forking_blocks_between_padded_steps_match_peft(peft_case, paged_graphs, monkeypatch):
    """Beams copy the block where the prompt ends and take their parents' blocks between steps: the fixed
    buffers are filled from the tables as they stand at each step."""
    monkeypatch.setattr(test_beam_search, "EngineConfig", functools.partial(EngineConfig, **PAGED))
    monkeypatch.setattr(test_beam_search, "Engine", padded_engine)
    test_beam_search.test_beam_search_matches_peft_generate_in_mixed_steps(peft_case)


def huge(backbone, num_tokens: int, seed: int):
    """A tenant's prefix at the largest magnitude an upload accepts (1e4): finite, accepted, hostile."""
    prefix = random_prefix(backbone, num_tokens, seed)
    prefix.targets = {k: v.sign() * 1e4 for k, v in prefix.targets.items()}
    return device_prefix(f"evil/huge{seed}", prefix)


def watch(engine: Engine) -> list[tuple[int, int, int]]:
    """(rows, padded rows, keys) of each decode step the engine's graphs run."""
    graphs, seen = engine.runner.graphs, []

    def watched(tokens, positions, length):
        seen.append((tokens.shape[0], *graphs.bucket(tokens.shape[0], length)))
        return graphs(tokens, positions, length)

    engine.runner.graphs = watched  # the runner calls it as it calls a DecodeGraphs
    return seen


def run(engine: Engine, jobs) -> list[list[int]]:
    engine.start()
    try:
        return asyncio.run(run_mixed(engine, jobs, stagger=True))
    finally:
        engine.stop()


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_padded_steps_equal_eager_paged_and_peft_with_preemption_and_a_hostile_tenant(peft_case, monkeypatch):
    """A tight pool (preemptions), four PEFT prefixes of 3-12 tokens and none, blocks of 4 (rows cross blocks),
    lengths that make rows leave at different steps, and a tenant with huge-valued and NaN/Inf prefixes in the
    same steps: padded static-buffer steps == the eager paged steps (kernel and gather) == PEFT."""
    backbone, prefixes, expected = _prefixes_gpt2(peft_case)
    hostile = [huge(backbone, 5, 1), huge(backbone, 9, 2)]
    hostile += [device_prefix(f"evil/{v}", poisoned(backbone, v)) for v in (float("nan"), float("inf"))]
    jobs, keys = [], []
    for p_index, prompt in enumerate(PROMPTS):
        for j, (prefix_id, prefix) in enumerate([(None, None), *prefixes.items()]):
            new = 4 + (p_index + j) % 7
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=new)))
            keys.append((prefix_id, p_index, new))
        jobs.append((hostile[p_index % 4], prompt, SamplingParams(max_new_tokens=MAX_NEW)))
        keys.append(("evil", p_index, MAX_NEW))
    eager = {"kernel": run(_tight_engine(backbone, 20), jobs)}
    monkeypatch.setattr(paged_kernel, "load", lambda: None)
    eager["gather"] = run(_tight_engine(backbone, 20), jobs)
    monkeypatch.setattr(test_paged_kv, "Engine", padded_engine)  # what _tight_engine builds
    engine = _tight_engine(backbone, 20)
    graphs = engine.runner.graphs
    assert isinstance(graphs, PagedDecodeGraphs)
    seen = watch(engine)
    padded = run(engine, jobs)
    assert engine.scheduler.num_preemptions > 0
    assert padded == eager["gather"] == eager["kernel"]
    for (prefix_id, p_index, new), tokens, job in zip(keys, padded, jobs, strict=True):
        if prefix_id != "evil":
            assert tokens == expected[prefix_id][p_index][:new], (prefix_id, p_index)
        elif job[0] in hostile[2:]:
            assert tokens == []  # NaN/Inf: failed at its first token
    assert any(
        len(tokens) == MAX_NEW for tokens, job in zip(padded, jobs, strict=True) if job[0] in hostile[:2]
    )
    assert any(rows < padded_rows for rows, padded_rows, _ in seen)  # pad rows ran
    assert len({padded_rows for _, padded_rows, _ in seen}) > 2  # rows joined and left across buckets
    assert all(k % LENGTH_STEP == 0 or k == graphs.max_positions for _, _, k in seen)  # table width: 84 keys


class FromHost(HostWaits):
    """HostWaits, and tensors made from Python data (torch.tensor: a host copy a graph would bake in)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.found.append(str(func))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_the_captured_region_never_waits_copies_from_the_host_or_writes_a_real_block_for_a_pad_row(
    tiny_gpt2_dir: Path, monkeypatch
):
    """Each padded step's `_run` (what a graph captures) calls nothing that waits on the device (no .item, .cpu,
    .tolist, bool/int, nonzero or boolean-mask indexing) and builds nothing from host data; the fill before it is the step's one copy. Between the two, the pool changes only
    at each real row's write position and in the scratch block; the zero block stays zero."""
    monkeypatch.setattr(paged_kernel, "load", lambda: None)
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    engine = padded_engine(backbone, EngineConfig(max_num_seqs=6, **PAGED))
    graphs, cache = engine.runner.graphs, engine.runner.cache
    assert isinstance(graphs, PagedDecodeGraphs) and isinstance(cache, PagedKVCache)
    mode, checked = FromHost(), []

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a host -> device copy inside the captured region")

    run_graph = graphs._run

    def watched(rows: int, keys: int) -> None:
        num_rows = engine.runner.batch.num_slots
        before = cache.kv.clone()
        with pytest.MonkeyPatch.context() as patch:
            for module in (cuda_graphs, paged_cache):
                patch.setattr(module, "copy_to_device", no_host_copy)
            patch.setattr(torch, "from_numpy", no_host_copy)
            with mode, count_host_syncs() as syncs:
                run_graph(rows, keys)
        assert syncs == []
        changed = (cache.kv != before).flatten(4).any(-1).any(0).any(0)  # [blocks, block_size]
        written = set()
        for slot in range(num_rows):
            logical = int(engine.runner.batch.seq_len[slot] + cache.shift[slot])
            written.add((int(cache.tables[slot, logical // cache.block_size]), logical % cache.block_size))
        if rows > num_rows:
            written.add((cache.scratch_block, 0))
        assert {tuple(x) for x in changed.nonzero().tolist()} <= written
        assert not cache.kv[:, :, 0].any()
        checked.append((num_rows, rows))

    graphs._run = watched
    prefixes = [None] + [device_prefix(f"t/r{n}", random_prefix(backbone, n, n)) for n in (1, 4, 7)]
    jobs = [
        (prefixes[i % 4], PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=3 + i % 6))
        for i in range(10)
    ]
    run(engine, jobs)
    assert mode.found == []
    assert any(rows > num_rows for num_rows, rows in checked)  # pad rows wrote the scratch block


def test_pad_rows_read_and_write_only_the_scratch_and_zero_blocks():
    shape = type("Shape", (), {"num_layers": 1, "kv_heads": 2, "head_dim": 8})
    cache = PagedKVCache(shape, 10, 4, 4, 5, torch.device("cpu"), torch.float32, has_scratch_block=True)
    assert cache.scratch_block == 10 and cache.kv.shape[2] == 11
    cache.tables[0, :3] = [3, 4, 5]
    cache.num_prefix[0], cache.shift[0] = 5, 3
    tables = cuda_graphs.StaticBlockTables(cache, 4)
    tables.fill(1, 4, 3)
    assert tables.rows[:4, :5].tolist() == [
        [5, 3, 3, 4, 5],
        [0, 0, 10, 0, 0],
        [0, 0, 10, 0, 0],
        [0, 0, 10, 0, 0],
    ]
    attention = tables.decode_attention(torch.tensor([8, 0, 0, 0]), 12)
    assert attention.write.tolist() == [5 * 4 + 3, 40, 40, 40]  # position 8: logical 11, block 5's last entry
    assert attention.mask[0, 0, 0].nonzero().flatten().tolist() == [
        0,
        1,
        2,
        3,
        4,
        8,
        9,
        10,
        11,
    ]  # P, then own
    assert attention.mask[1:, 0, 0].nonzero().tolist() == [[0, 0], [1, 0], [2, 0]]  # a pad row sees its key 0
    with pytest.raises(ValueError, match="scratch block"):
        cuda_graphs.StaticBlockTables(PagedKVCache(shape, 10, 4, 4, 5, torch.device("cpu"), torch.float32), 4)


def test_the_scratch_block_comes_out_of_the_budget(tiny_gpt2_dir: Path):
    """With graphs the pool gives up one block of --kv-cache-bytes to the scratch block; the cache stays within."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    per_block = PagedKVCache.bytes_per_block(backbone.shape, 4, torch.float32)
    config = EngineConfig(max_num_seqs=4, max_model_len=32, kv_cache_bytes=30 * per_block, **PAGED)
    eager, graphed = Engine(backbone, config).runner, padded_engine(backbone, config).runner
    assert eager.graphs is None and eager.cache.scratch_block is None
    assert graphed.block_pool.num_usable == eager.block_pool.num_usable - 1 == 28
    assert graphed.cache.num_bytes == eager.cache.num_bytes == 30 * per_block
    assert "block tables in fixed buffers" in graphed.decode_mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_paged_decode_graphs_are_captured_and_replayed_on_cuda(peft_case):
    kind, model_dir, adapters, _ = peft_case
    backbone = load_backbone(model_dir, "cuda", "float32")
    prefixes = {None: None, **peft_device_prefixes(adapters, "cuda")}
    expected = {
        prefix_id: peft_generate(model_dir, kind, adapters.get(prefix_id), PROMPTS, MAX_NEW, device="cuda")
        for prefix_id in prefixes
    }
    engine = Engine(backbone, EngineConfig(max_num_seqs=7, **PAGED))
    graphs = engine.runner.graphs
    assert isinstance(graphs, PagedDecodeGraphs) and graphs.capture
    jobs = [
        (prefixes[p], prompt, SamplingParams(max_new_tokens=MAX_NEW)) for prompt in PROMPTS for p in prefixes
    ]
    results = run(engine, jobs)
    assert results == [expected[p][i] for i in range(len(PROMPTS)) for p in prefixes]
    assert len(graphs.graphs) > 1  # several buckets captured, each replayed
    assert not engine.runner.cache.kv[:, :, 0].any()  # the zero block stayed zero
