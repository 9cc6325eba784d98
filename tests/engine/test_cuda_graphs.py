"""Decode steps padded to graph buckets (server/engine/cuda_graphs.py) stay PEFT-exact.

On CPU the padded shapes run eagerly (`capture=False`): the same rows, keys and pad rows a CUDA graph
replays, so what these tests check is the padding itself — pad rows writing position 0 of free slots, keys
rounded up to a multiple of LENGTH_STEP — with sequences joining and leaving those slots mid-flight. On CUDA
the graphs themselves are checked by tests/engine/test_gpu.py and by `pytest --device cuda` (graphs are on by
default there). The runner builds the graphs itself in these tests (padded_engine): on CPU, uncaptured. The paged
layout's graphs (block tables in fixed buffers) run these tests again in test_paged_cuda_graphs.py.
"""

from __future__ import annotations

import asyncio

import peft_oracle
import pytest
from peft_oracle import PROMPTS, assert_prefixes_matter
from test_engine_exactness import peft_device_prefixes, run_mixed

from server.engine import runner
from server.engine.backbone import load_backbone
from server.engine.cuda_graphs import LENGTH_STEP, PagedDecodeGraphs, batch_buckets
from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import PagedKVCache
from server.engine.request import SamplingParams


def graphs_on_cpu(config: EngineConfig, backbone) -> bool:
    """runner.uses_graphs without its device check: on CPU the runner builds its decode graphs, uncaptured."""
    return config.cuda_graphs and not backbone.spec.is_encoder_decoder


def padded_engine(backbone, config: EngineConfig, **kwargs) -> Engine:
    """An Engine whose runner builds decode graphs wherever it would on CUDA (captured there, run padded here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "uses_graphs", graphs_on_cpu)
        return Engine(backbone, config, **kwargs)


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(70) == [1, 2, 4, 8, 16, 32, 48, 64, 70]


def test_padded_decode_is_exact_with_sequences_joining_and_leaving(peft_case) -> None:
    kind, model_dir, adapters, expected = peft_case
    assert_prefixes_matter(expected)
    device = peft_oracle.DEVICE
    backbone = load_backbone(model_dir, device, "float32")
    if kind == "bart":  # decode graphs are for decoder-only backbones: BART decodes eagerly, on CUDA too
        runner = Engine(backbone, EngineConfig(max_num_seqs=7, cuda_graphs=True)).runner
        assert runner.graphs is None and runner.decode_mode.startswith("eager")
        return
    prefixes = {None: None, **peft_device_prefixes(adapters, device)}
    engine = padded_engine(backbone, EngineConfig(max_num_seqs=7))
    graphs = engine.runner.graphs
    assert graphs.capture == (device == "cuda")
    assert isinstance(graphs, PagedDecodeGraphs) == isinstance(engine.runner.cache, PagedKVCache)
    seen: list[tuple[int, int, int]] = []  # (rows, padded rows, keys) of each decode step

    def watched(tokens, positions, length):
        seen.append((tokens.shape[0], *graphs.bucket(tokens.shape[0], length)))
        return graphs(tokens, positions, length)

    engine.runner.graphs = watched  # the runner calls it as it calls a DecodeGraphs
    # different lengths (max_new_tokens) so sequences leave at different steps and others take their slots
    jobs, keys = [], []
    for p_index in range(len(PROMPTS)):
        for j, prefix_id in enumerate(prefixes):
            new = 3 + (p_index + j) % 8
            jobs.append((prefixes[prefix_id], PROMPTS[p_index], SamplingParams(max_new_tokens=new)))
            keys.append((prefix_id, p_index, new))
    engine.start()
    try:
        results = asyncio.run(run_mixed(engine, jobs, stagger=True))
    finally:
        engine.stop()
    mismatches = [
        (k, got) for k, got in zip(keys, results, strict=True) if got != expected[k[0]][k[1]][: k[2]]
    ]
    assert not mismatches, mismatches
    assert any(rows < padded for rows, padded, _ in seen), seen  # pad rows ran
    assert bool(graphs.graphs) == (device == "cuda")  # on CUDA these steps were graph replays
    assert all(keys % LENGTH_STEP == 0 or keys == graphs.max_positions for _, _, keys in seen)
