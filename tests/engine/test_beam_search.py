"""Beam search in the engine equals PEFT's / HF's generate(num_beams=k, do_sample=False), token for token,
while greedy, sampled and other beam requests share the steps; a beam group holds k slots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS, peft_generate
from test_engine_exactness import device_prefix, peft_device_prefixes, random_native
from test_fault_isolation import count_host_syncs

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams
from server.engine.runner import ModelRunner, _copy_kv
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.step import BeamResult, StepInput, StepOutput

SETTINGS = [
    {},
    {"length_penalty": 2.0, "early_stopping": True},
    {"length_penalty": 0.5},
    {"repetition_penalty": 1.3},
]


def run_jobs(backbone, jobs, max_num_seqs: int):
    """Run (prefix, prompt, params) jobs in one engine, staggered; returns (token ids, finish reasons,
    per-forward [(number of beam groups, number of other rows)])."""
    forwards: list[tuple[int, int]] = []

    def on_forward(requests: list[Request]) -> None:
        groups = {id(r) for r in requests if r.params.num_beams > 1}
        forwards.append((len(groups), sum(r.params.num_beams == 1 for r in requests)))

    engine = Engine(backbone, EngineConfig(max_num_seqs=max_num_seqs), on_forward=on_forward)

    async def one(index: int, prefix, prompt: str, params: SamplingParams):
        await asyncio.sleep(0.002 * (index % 5))
        request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id if prefix else None)
        outputs = [o async for o in engine.stream(request)]
        return [o.token_id for o in outputs if o.token_id is not None], outputs[-1].finish_reason

    async def everything():
        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    engine.start()
    try:
        results = asyncio.run(everything())
    finally:
        engine.stop()
    return [r[0] for r in results], [r[1] for r in results], forwards


def test_beam_search_matches_peft_generate_in_mixed_steps(peft_case):
    """Every (prefix, prompt) pair runs beam search with one of SETTINGS (rotating, so each setting meets
    prefixes of several lengths), next to greedy, sampled and 3-beam requests, in one engine."""
    kind, model_dir, adapters, expected_greedy = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    prefixes = {None: None, **peft_device_prefixes(adapters)}
    paths = {None: None, **adapters}
    jobs, keys = [], []
    for p_index, prompt in enumerate(PROMPTS):
        for x_index, (prefix_id, prefix) in enumerate(prefixes.items()):
            settings = SETTINGS[(p_index + x_index) % len(SETTINGS)]
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW, num_beams=4, **settings)))
            keys.append(("beam", prefix_id, p_index, settings))
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append(("greedy", prefix_id, p_index, {}))
        jobs.append((None, prompt, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=p_index)))
        keys.append(("sampled", None, p_index, {}))
        if p_index < 2:
            jobs.append((prefixes["t/a1"], prompt, SamplingParams(max_new_tokens=MAX_NEW, num_beams=3)))
            keys.append(("beam3", "t/a1", p_index, {"num_beams": 3}))
    results, reasons, forwards = run_jobs(backbone, jobs, max_num_seqs=24)

    # PEFT's answers, one model load per (prefix, settings)
    asked: dict[tuple, list[int]] = {}
    for what, prefix_id, p_index, settings in keys:
        if what.startswith("beam"):
            asked.setdefault((prefix_id, json.dumps(settings)), []).append(p_index)
    oracle = {}
    for (prefix_id, settings), indices in asked.items():
        generate = {"num_beams": 4, **json.loads(settings)}
        answers = peft_generate(
            model_dir, kind, paths[prefix_id], [PROMPTS[i] for i in indices], MAX_NEW, **generate
        )
        oracle |= {(prefix_id, settings, i): a for i, a in zip(indices, answers, strict=True)}

    mismatches = []
    for (what, prefix_id, p_index, settings), got in zip(keys, results, strict=True):
        if what == "sampled":
            continue
        want = (
            expected_greedy[prefix_id][p_index]
            if what == "greedy"
            else oracle[(prefix_id, json.dumps(settings), p_index)]
        )
        if got != want:
            mismatches.append((what, prefix_id, p_index, settings, got, want))
    assert not mismatches, mismatches
    # the oracle is not degenerate: beam search differs from greedy somewhere, and stops both ways
    beam = [r for k, r in zip(keys, results, strict=True) if k[0] == "beam"]
    greedy = [r for k, r in zip(keys, results, strict=True) if k[0] == "greedy"]
    assert beam != greedy
    assert any(len(r) > 2 for r in beam)
    assert {r for k, r in zip(keys, reasons, strict=True) if k[0] == "beam"} <= {"stop", "length"}
    # the steps were shared: several beam groups next to greedy/sampled rows in one forward
    assert max(min(groups, 2) + min(others, 1) for groups, others in forwards) == 3, forwards


def test_length_penalty_and_early_stopping_change_the_answer(peft_case):
    """Guards the settings tests above against settings that never matter on these tiny models."""
    kind, model_dir, adapters, _ = peft_case
    path = adapters["t/a2"]
    outs = {
        str(s): peft_generate(model_dir, kind, path, PROMPTS[:3], MAX_NEW, num_beams=4, **s) for s in SETTINGS
    }
    assert len({str(v) for v in outs.values()}) > 1, outs


def test_one_host_sync_per_beam_step_and_none_added_without_beams(tiny_gpt2_dir: Path):
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    runner = ModelRunner(backbone, EngineConfig(max_num_seqs=12, max_model_len=128, max_prefix_tokens=16))
    greedy = Request("g", [5, 6, 7], SamplingParams(max_new_tokens=30), row=0)
    sampled = Request("s", [5, 6, 8], SamplingParams(max_new_tokens=30, temperature=0.9, seed=1), row=1)
    group = Request("b", [5, 6, 9], SamplingParams(max_new_tokens=30, num_beams=4), row=2)
    other = Request("c", [7, 8], SamplingParams(max_new_tokens=30, num_beams=3), row=3)
    requests = [greedy, sampled, group, other]
    runner.execute(StepInput(prefill=requests, decode=[], finished=[]))
    assert runner.batch.num_slots == 1 + 1 + 4 + 3
    for _ in range(3):
        with count_host_syncs() as calls:
            out = runner.execute(StepInput(prefill=[], decode=requests, finished=[])).tokens(requests)
        assert out[:2] == runner.batch.last_token[:2].tolist()
        assert all(isinstance(r, BeamResult) and r.token_ids is None for r in out[2:])
        assert calls == ["tolist", "tolist"], calls  # the sampler's, and the beam groups' one
    runner.execute(StepInput(prefill=[], decode=[group, other], finished=[greedy, sampled]))
    with count_host_syncs() as calls:
        runner.execute(StepInput(prefill=[], decode=[group, other], finished=[]))
    assert calls == ["tolist"], calls


def test_forking_copies_only_the_generated_part_as_one_gather():
    from prefix_store.format import BackboneShape

    cache = KVCache(BackboneShape("gpt2", 2, 2, 4), 4, 16, 0, torch.device("cpu"), torch.float32)
    cache.self_kv.copy_(torch.randn_like(cache.self_kv))
    before = cache.self_kv.clone()
    # a permutation (0 <- 1, 1 <- 2, 2 <- 0) of the generated part [6, 10): no row reads a half-written one
    _copy_kv(cache, [1, 2, 0], [0, 1, 2], 6, 10, 0)
    for dst, src in ((0, 1), (1, 2), (2, 0)):
        assert torch.equal(cache.self_kv[:, :, dst, :, 6:10], before[:, :, src, :, 6:10])
        assert torch.equal(cache.self_kv[:, :, dst, :, :6], before[:, :, dst, :, :6])  # prefix + prompt kept
        assert torch.equal(cache.self_kv[:, :, dst, :, 10:], before[:, :, dst, :, 10:])
    assert torch.equal(cache.self_kv[:, :, 3], before[:, :, 3])


def test_a_beam_group_is_admitted_only_when_its_slots_are_free_and_counts_them():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, eos_token_ids=frozenset({0})))
    first = [Request(f"g{i}", [1, 2], SamplingParams(max_new_tokens=2)) for i in range(3)]
    group = Request("b", [1, 2], SamplingParams(max_new_tokens=5, num_beams=4))
    late = Request("late", [1, 2], SamplingParams(max_new_tokens=5))
    for request in [*first, group, late]:
        scheduler.add(request)
    batch = scheduler.schedule()
    assert batch.prefill == first  # 3 slots used, 3 free: the group (4) waits and nobody overtakes it
    scheduler.update(batch, StepOutput.of(batch.sequences, [7, 7, 7]))
    batch = scheduler.schedule()
    assert batch.prefill == [] and batch.decode == first
    scheduler.update(batch, StepOutput.of(batch.sequences, [7, 7, 7]))  # max_new_tokens 2: the three finish
    batch = scheduler.schedule()
    assert batch.finished == first and batch.prefill == [group, late]  # 4 + 1 of 6 slots
    counter = scheduler.counters[""]
    scheduler.update(batch, StepOutput.of(batch.sequences, [BeamResult(1), 7]))
    assert scheduler.counters[""] == counter + 2.0 * 2  # one row ran for the group's first step, one for late
    batch = scheduler.schedule()
    counter = scheduler.counters[""]
    scheduler.update(batch, StepOutput.of(batch.sequences, [BeamResult(4), 7]))
    assert scheduler.counters[""] == counter + 2.0 * 5
    assert group.output_token_ids == [] and not group.is_finished
    batch = scheduler.schedule()
    scheduler.update(batch, StepOutput.of(batch.sequences, [BeamResult(4, [3, 4, 0]), 7]))
    assert group.output_token_ids == [3, 4] and group.finish_reason == "stop"  # EOS ends it, not reported
    batch = scheduler.schedule()
    assert group in batch.finished


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.7),
        ("top_k", 5),
        ("top_p", 0.9),
        ("seed", 3),
        ("stop", ("x",)),
        ("ignore_eos", True),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("logprobs", 2),
    ],
)
def test_sampling_fields_beam_search_does_not_take_are_refused_by_name(field: str, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(num_beams=4, **{field: value})
    SamplingParams(num_beams=1, **{field: value})  # fine without beams


def test_eos_handling_equals_hf_on_a_backbone_that_likes_eos(tmp_path: Path):
    """The bare backbone against HF's generate(num_beams=4) where EOS is often among the candidates: beams
    that finish early (even at once, giving no tokens), beams that a later, longer hypothesis beats, and
    length penalties that favour short or long answers."""
    from tiny_models import build_gpt2
    from transformers import GPT2LMHeadModel

    model_dir = build_gpt2(tmp_path / "eos-gpt2")
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    with torch.no_grad():  # a larger EOS embedding (tied to the LM head): EOS gets likely
        model.transformer.wte.weight[model.config.eos_token_id] *= 2.0
    model.save_pretrained(model_dir)
    backbone = load_backbone(model_dir, "cpu", "float32")
    settings = [{}, {"length_penalty": 2.0, "early_stopping": True}, {"length_penalty": -1.0}]
    jobs = [(None, p, SamplingParams(max_new_tokens=12, num_beams=4, **s)) for s in settings for p in PROMPTS]
    jobs += [(None, p, SamplingParams(max_new_tokens=12)) for p in PROMPTS]
    results, reasons, _ = run_jobs(backbone, jobs, max_num_seqs=10)
    expected = [
        answer
        for s in settings
        for answer in peft_generate(model_dir, "gpt2", None, PROMPTS, 12, num_beams=4, **s)
    ]
    expected += peft_generate(model_dir, "gpt2", None, PROMPTS, 12)
    assert results == expected
    beams = list(zip(results[: -len(PROMPTS)], reasons[: -len(PROMPTS)], strict=True))
    assert any(r == "stop" and 0 < len(t) < 12 for t, r in beams)  # finished on EOS mid-way
    assert any(r == "stop" and not t for t, r in beams)  # the best hypothesis is EOS at once
    assert any(r == "length" for _, r in beams)


def test_a_poisoned_beam_group_fails_alone_and_leaves_clean_slots(tiny_gpt2_dir: Path):
    from test_fault_isolation import poisoned

    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    bad = device_prefix("evil/nan", poisoned(backbone, float("nan")))
    beams = SamplingParams(max_new_tokens=MAX_NEW, num_beams=4)
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    jobs = []
    for prompt in PROMPTS[:3]:
        jobs += [(bad, prompt, beams), (None, prompt, beams), (None, prompt, greedy)]
    alone = [run_jobs(backbone, [job], max_num_seqs=4)[0][0] for job in jobs[1:3]]
    results, reasons, _ = run_jobs(backbone, jobs, max_num_seqs=8)  # 8 slots: poisoned slots are reused
    assert reasons[0::3] == ["error"] * 3 and results[0::3] == [[]] * 3
    assert results[1:3] == alone
    assert results[1::3] == peft_generate(tiny_gpt2_dir, "gpt2", None, PROMPTS[:3], MAX_NEW, num_beams=4)
    assert results[2::3] == peft_generate(tiny_gpt2_dir, "gpt2", None, PROMPTS[:3], MAX_NEW)


def test_prefix_and_prompt_are_copied_once_then_only_generated_entries(tiny_bart_dir: Path, monkeypatch):
    """BART: the source is encoded once, the start token decoded once; then the group's other slots get that
    row's entries once, and each later step moves only entries past prefix + start token."""
    import server.engine.runner as runner_module

    copies: list[tuple[list[int], list[int], int, int, int]] = []
    original = runner_module._copy_kv

    def recording(cache, src, dst, start, end, cross_len):
        copies.append((src, dst, start, end, cross_len))
        original(cache, src, dst, start, end, cross_len)

    monkeypatch.setattr(runner_module, "_copy_kv", recording)
    backbone = load_backbone(tiny_bart_dir, "cpu", "float32")
    prefix = device_prefix("t/n", random_native("bart", backbone, {"decoder": 5, "cross": 3}, seed=1))
    runner = ModelRunner(backbone, EngineConfig(max_num_seqs=4, max_model_len=128, max_prefix_tokens=16))
    group = Request("b", [5, 6, 7, 8], SamplingParams(max_new_tokens=12, num_beams=4), prefix=prefix, row=0)
    runner.execute(StepInput(prefill=[group], decode=[], finished=[]))
    assert runner.batch.num_slots == 4
    # the first copy: slot 0's prefix + start token (self) and cross prefix + 4 source tokens (cross)
    assert copies[0] == ([0, 0, 0], [1, 2, 3], 0, 5 + 1, 3 + 4)
    for _ in range(6):
        runner.execute(StepInput(prefill=[], decode=[group], finished=[]))
    for src, dst, start, end, cross_len in copies[1:]:
        assert start == 5 + 1 < end and cross_len == 0 and len(src) == len(set(dst)) == len(dst) <= 4
    assert len(copies) > 1, "no beam ever continued another: the test shows nothing"
