"""A request whose own numbers break fails alone; sampling is safe for every value the API accepts;
the batched sampler waits on the device once per step; seeded sampling does not depend on the batch."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, run_engine

from prefix_store.families import family
from prefix_store.format import Prefix, import_peft
from server.engine.backbone import GenerationRules, load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import Request, SamplingParams, ScheduledBatch
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler

RULES = GenerationRules(frozenset({0}), None, 0, None, None, None)


def poisoned(backbone, value: float, num_tokens: int = 4) -> Prefix:
    """A prefix the upload check would refuse (NaN, Inf): here it goes straight to the engine."""
    shape = backbone.shape
    tensor = torch.randn(shape.num_layers, 2, shape.num_heads, num_tokens, shape.head_dim)
    tensor[:, :, :, 0] = value
    return Prefix("gpt2", {"decoder": tensor})


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)  # BART shares the runner and sampler
def test_poisoned_rows_fail_alone_and_their_slots_are_clean_for_the_next(peft_case):
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    good = {
        prefix_id: device_prefix(
            prefix_id,
            import_peft(
                (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()
            ),
        )
        for prefix_id, path in adapters.items()
    }
    bad = [device_prefix(f"evil/{v}", poisoned(backbone, v)) for v in (float("nan"), float("inf"))]
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=3)
    jobs, keys = [], []
    for i, prompt in enumerate(PROMPTS):
        jobs.append((bad[i % 2], prompt, sampled if i % 3 == 0 else greedy))
        keys.append(("bad", i))
        for prefix_id, prefix in good.items():
            jobs.append((prefix, prompt, greedy))
            keys.append((prefix_id, i))
    engine = Engine(backbone, EngineConfig(max_num_seqs=4))
    engine.start()
    try:

        async def one(prefix, prompt, params):
            request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id)
            return [o async for o in engine.stream(request)]

        async def everything():
            return await asyncio.gather(*(one(*job) for job in jobs))

        outputs = asyncio.run(everything())
    finally:
        engine.stop()
    for (prefix_id, i), outs in zip(keys, outputs, strict=True):
        if prefix_id == "bad":
            assert outs[-1].error_code == "numerical_error" and outs[-1].finish_reason == "error"
            assert [o.token_id for o in outs if o.token_id is not None] == []
        else:  # 4 slots for 25 requests: every slot a poisoned request used was reused by good ones
            tokens = [o.token_id for o in outs if o.token_id is not None]
            assert tokens == expected[prefix_id][i], (prefix_id, PROMPTS[i])
            assert outs[-1].error is None


def rows(*params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", [1, 2], p) for i, p in enumerate(params)]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=5e-324),
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1e-38, top_k=1),
        SamplingParams(temperature=1e-300, top_p=1e-300),
        SamplingParams(temperature=100.0, top_k=1_000_000),
        SamplingParams(temperature=0.7, top_p=5e-324, seed=1),
    ],
)
def test_sampling_is_safe_at_the_extremes(params: SamplingParams):
    logits = torch.randn(3, 50) * 30
    logits[1, 7] = 3e38
    logits[1, 8] = -3e38
    requests = rows(params, params, params)
    out = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests).token_ids
    assert all(t is not None and 0 <= t < 50 for t in out)
    if params.temperature < 1e-30 or params.top_p < 1e-100 or params.top_k == 1:
        assert out == logits.argmax(dim=-1).tolist()  # greedy up to exact ties


def test_non_finite_rows_are_reported_and_others_keep_their_tokens():
    logits = torch.randn(4, 30)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    requests = rows(
        SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=1e-40)
    )
    result = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests)
    assert result.failed == [1, 2]
    assert result.token_ids[0] == int(logits[0].argmax()) and result.token_ids[3] == int(logits[3].argmax())


def hf_filtered(logits, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores


@pytest.mark.parametrize(
    "params",
    [
        [(0.7, 9, 0.8)] * 6,  # the bounded ranking (top-k) with top-p
        [(0.7, 9, 0.8), (1.3, 0, 0.9), (0.5, 40, 1.0), (1.0, 0, 1.0), (2.0, 3, 0.3), (0.9, 700, 0.95)],
        [(1.0, 5, 1.0), (0.8, 17, 1.0), (1.0, 0, 1.0), (1.2, 1, 0.5), (0.6, 64, 0.7), (1.0, 2, 0.99)],
        [(1.0, 2, 1.0), (1.0, 1, 0.9), (0.5, 3, 0.6), (3.0, 1, 1.0)],  # ties beyond the ranked depth (3)
    ],
)
def test_top_k_and_top_p_keep_what_hf_keeps(params):
    from server.engine.sampler import filtered_scores, ranking_depth

    vocab = 1000
    logits = torch.randn(len(params), vocab) * 3
    logits[:, :7] = 9.0  # a tie across the k-th best for k in 1..7
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*params, strict=True))
    depth = ranking_depth([SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in params], vocab)
    for d in (None, depth):  # the whole vocabulary sorted, or the bounded ranking the sampler uses
        ours = filtered_scores(logits, temperature.float(), top_k, top_p.float(), depth=d)
        for row, (t, k, p) in enumerate(params):
            hf = hf_filtered(logits[row : row + 1], t, k, p)[0]
            # the same tokens kept, up to which of exactly tied tokens top-p cuts (an order both leave open)
            kept, kept_by_hf = (logits[row][torch.isfinite(x)].sort().values for x in (ours[row], hf))
            assert torch.equal(kept, kept_by_hf), (d, params[row])


@contextlib.contextmanager
def count_host_syncs():
    """Counts the calls that make the host wait for the device (.item/.tolist/.cpu/.numpy/bool/int/float)."""
    calls: list[str] = []
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in names:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_one_host_sync_per_decode_step_whatever_the_mix(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    runner = ModelRunner(backbone, max_num_seqs=8, max_model_len=128, max_prefix_tokens=16)
    mix = [
        SamplingParams(max_new_tokens=20),
        SamplingParams(max_new_tokens=20, temperature=0.9),
        SamplingParams(max_new_tokens=20, temperature=0.9, seed=5),
        SamplingParams(max_new_tokens=20, temperature=1.2, top_k=5, top_p=0.9, seed=6),
        SamplingParams(max_new_tokens=20, temperature=1e-40),
    ]
    requests = [Request(f"r{i}", [5, 6, 7 + i], p) for i, p in enumerate(mix)]
    runner.execute(ScheduledBatch(prefill=requests, decode=[], finished=[]))
    for _ in range(3):
        with count_host_syncs() as calls:
            out = runner.execute(ScheduledBatch(prefill=[], decode=requests, finished=[]))
        assert len(out) == len(requests) and None not in out
        assert calls == ["tolist"], calls


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    seeded = (None, "hello there", SamplingParams(max_new_tokens=16, temperature=1.1, top_p=0.95, seed=77))
    alone = run_engine(backbone, [seeded], max_num_seqs=1, stagger=False)[0][0]
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
        batched = run_engine(backbone, jobs, max_num_seqs=6)[0]
        assert batched[position] == alone
