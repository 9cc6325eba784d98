"""Mixed-prefix continuous batching is exact: every request gets what PEFT gives it alone."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import peft_oracle
import torch
from peft_oracle import MAX_NEW, PROMPTS, assert_prefixes_matter

from prefix_store.cache import DevicePrefix
from prefix_store.format import Prefix, import_peft, save_prefix
from prefix_store.store import make_meta
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams


def device_prefix(prefix_id: str, prefix: Prefix) -> DevicePrefix:
    meta = make_meta(prefix_id, prefix, save_prefix(prefix), "native", False)
    return DevicePrefix(meta=meta, targets=prefix.targets, num_bytes=prefix.num_bytes)


def peft_device_prefixes(adapters: dict[str, Path], device: str = "cpu") -> dict[str, DevicePrefix]:
    """peft_case's PEFT adapters imported as the engine holds them, their tensors on `device`."""
    prefixes = {}
    for prefix_id, path in adapters.items():
        imported = import_peft(
            (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()
        )
        imported.targets = {k: v.to(device) for k, v in imported.targets.items()}
        prefixes[prefix_id] = device_prefix(prefix_id, imported)
    return prefixes


async def run_mixed(
    engine: Engine, jobs: list[tuple[DevicePrefix | None, str, SamplingParams]], stagger: bool
):
    """Submit jobs interleaved (and, with stagger, some while others are mid-flight); collect token ids."""

    async def one(index: int, prefix: DevicePrefix | None, prompt: str, params: SamplingParams) -> list[int]:
        if stagger:
            await asyncio.sleep(0.003 * (index % 7))
        request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id if prefix else None)
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))


def run_engine(backbone, jobs, max_num_seqs: int = 6, stagger: bool = True):
    distinct: list[int] = []
    engine = Engine(
        backbone,
        EngineConfig(max_num_seqs=max_num_seqs),
        on_forward=lambda rs: distinct.append(len({r.prefix_id for r in rs})),
    )
    engine.start()
    try:
        return asyncio.run(run_mixed(engine, jobs, stagger)), distinct
    finally:
        engine.stop()


def test_mixed_batches_match_peft_token_for_token(peft_case):
    kind, model_dir, adapters, expected = peft_case
    assert_prefixes_matter(expected)
    device = peft_oracle.DEVICE  # `pytest --device cuda`: engine and oracle on the GPU, float32
    backbone = load_backbone(model_dir, device, "float32")
    prefixes: dict[str | None, DevicePrefix | None] = {None: None, **peft_device_prefixes(adapters, device)}
    # interleave prefixes so that each step carries several of them, with different lengths and no prefix
    jobs, keys = [], []
    for p_index in range(len(PROMPTS)):
        for prefix_id in prefixes:
            jobs.append((prefixes[prefix_id], PROMPTS[p_index], SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, p_index))
    results, distinct = run_engine(backbone, jobs)
    assert any(len(ids) > 2 for ids in results), "degenerate oracle: every generation is (almost) empty"
    mismatches = [
        (k, got, expected[k[0]][k[1]])
        for k, got in zip(keys, results, strict=True)
        if got != expected[k[0]][k[1]]
    ]
    assert not mismatches, mismatches
    assert max(distinct) >= 4, f"steps did not mix prefixes: {distinct}"


def random_native(kind: str, backbone, num_tokens: dict[str, int], seed: int) -> Prefix:
    generator = torch.Generator().manual_seed(seed)
    shape = backbone.shape
    targets = {
        name: torch.randn(shape.num_layers, 2, shape.num_heads, n, shape.head_dim, generator=generator)
        for name, n in num_tokens.items()
    }
    return Prefix(model_type=kind, targets=targets)


def test_native_bart_three_targets_batched_equals_alone(tiny_bart_dir: Path):
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    natives = [
        random_native("bart", backbone, {"encoder": n, "decoder": n, "cross": n}, seed=n)
        for n in (2, 4, 7, 11)
    ] + [
        random_native("bart", backbone, {"cross": 3}, seed=99),
        random_native("bart", backbone, {"encoder": 6}, seed=98),
    ]
    prefixes = [None] + [device_prefix(f"t/n{i}", p) for i, p in enumerate(natives)]
    jobs = [(p, prompt, SamplingParams(max_new_tokens=MAX_NEW)) for prompt in PROMPTS[:3] for p in prefixes]
    alone = [run_engine(backbone, [job], max_num_seqs=1, stagger=False)[0][0] for job in jobs]
    batched, distinct = run_engine(backbone, jobs, max_num_seqs=8)
    assert batched == alone
    assert max(distinct) >= 4
    # each target changes the output: the prefixes really are applied
    assert len({tuple(a) for a in alone[: len(prefixes)]}) == len(prefixes)


def test_seeded_sampling_is_reproducible(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    jobs = [
        (None, "hello", params),
        (None, "hello", params),
        (None, "the quick", SamplingParams(max_new_tokens=12)),
    ]
    results, _ = run_engine(backbone, jobs, stagger=False)
    assert results[0] == results[1]
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0)
    other, _ = run_engine(backbone, [(None, "hello", unseeded)] * 3, stagger=False)
    assert len({tuple(r) for r in other}) > 1, "unseeded sampling should differ between requests"


def test_aborted_and_finished_slots_are_reused_correctly(tiny_gpt2_dir: Path):
    """Requests leaving mid-batch (compaction moves other rows) do not disturb the rest."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    rng = random.Random(0)
    jobs = [
        (None, PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=rng.randint(1, 14)))
        for i in range(20)
    ]
    alone = [run_engine(backbone, [job], max_num_seqs=1, stagger=False)[0][0] for job in jobs]
    batched, _ = run_engine(backbone, jobs, max_num_seqs=5)
    assert batched == alone
