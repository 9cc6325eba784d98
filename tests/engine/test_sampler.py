"""Penalties equal HF's (repetition) and OpenAI's formula (presence/frequency) on fixed logits; logprobs are
log_softmax of the distribution each token was drawn from; all in the one batched step."""

from __future__ import annotations

import torch
from test_fault_isolation import count_host_syncs
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from prefix_store.families import family
from server.engine.backbone import GenerationRules
from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

RULES = GenerationRules(frozenset({0}), None, 0, None, None, None)
VOCAB = 40


def sampler() -> Sampler:
    return Sampler(RULES, family("gpt2"), torch.device("cpu"))


def test_repetition_penalty_is_hf_s():
    logits = torch.randn(1, VOCAB) * 4
    prompt = [3, 7, 7, 12]
    request = Request("r", prompt, SamplingParams(repetition_penalty=1.7, logprobs=5))
    out = sampler().sample(logits.clone(), [request])
    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt]), logits.clone())
    assert out.token_ids == [int(hf.argmax())]
    assert abs(out.logprobs[0].logprob - float(torch.log_softmax(hf, -1).max())) < 1e-5


def test_penalties_follow_the_generated_tokens_step_by_step():
    s = sampler()
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logprobs=0)
    request = Request("r", [1, 2], params)
    generated: list[int] = []
    for step in range(6):
        logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        logits[0, 9] = 10.0  # a favourite that the penalties must push down once repeated
        token = s.sample(logits.clone(), [request]).token_ids[0]
        # expected: HF repetition over prompt + generated, then OpenAI's over the generated counts
        expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, *generated]]), logits.clone())
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=VOCAB).float()
        expected = expected - 0.5 * (counts > 0) - 0.25 * counts
        assert token == int(expected.argmax()), step
        generated.append(token)
        request.output_token_ids.append(token)


def test_logprobs_are_of_the_distribution_drawn_from():
    logits = torch.randn(3, VOCAB) * 2
    greedy = Request("g", [1], SamplingParams(logprobs=4))
    sampled = Request("s", [1], SamplingParams(temperature=0.7, top_k=6, seed=1, logprobs=10))
    silent = Request("n", [1], SamplingParams())
    out = sampler().sample(logits.clone(), [greedy, sampled, silent])
    want = torch.log_softmax(logits[0], -1)
    assert abs(out.logprobs[0].logprob - float(want.max())) < 1e-6
    top = want.topk(4)
    assert [t for t, _ in out.logprobs[0].top] == top.indices.tolist()
    assert all(abs(a - b) < 1e-6 for (_, a), b in zip(out.logprobs[0].top, top.values.tolist(), strict=True))
    warped = TopKLogitsWarper(6)(None, TemperatureLogitsWarper(0.7)(None, logits[1:2].clone()))[0]
    drawn = torch.log_softmax(warped, -1)
    token = out.token_ids[1]
    assert abs(out.logprobs[1].logprob - float(drawn[token])) < 1e-5
    assert len(out.logprobs[1].top) == 6  # only tokens top-k can draw are alternatives
    assert [lp for _, lp in out.logprobs[1].top] == sorted(
        (lp for _, lp in out.logprobs[1].top), reverse=True
    )
    assert out.logprobs[2] is None


def test_still_one_host_sync_with_penalties_and_logprobs():
    s = sampler()
    requests = [
        Request("a", [1, 2], SamplingParams(repetition_penalty=1.2, logprobs=3)),
        Request("b", [1, 2], SamplingParams(temperature=0.9, presence_penalty=1.0, seed=2, logprobs=20)),
        Request("c", [1, 2], SamplingParams()),
    ]
    s.sample(torch.randn(3, VOCAB), requests)  # first step builds the histories
    with count_host_syncs() as calls:
        s.sample(torch.randn(3, VOCAB), requests)
    assert calls == ["tolist"], calls


def test_array_uniforms_equal_the_per_request_ones():
    """keyed_uniforms (the persistent batch's arrays of seeds and steps) is step_uniform, bit for bit."""
    import numpy as np

    from server.engine.sampler import keyed_uniforms, seed_key, step_uniform

    seeds = [0, 1, 77, 2**63 - 1, 123456789]
    steps = [0, 1, 5, 1023, 64]
    keys = np.array([seed_key(s) for s in seeds], dtype=np.uint64)
    got = keyed_uniforms(keys, np.array(steps, dtype=np.int64)).tolist()
    assert got == [step_uniform(s, t) for s, t in zip(seeds, steps, strict=True)]


def test_min_tokens_masks_eos_and_stop_ids_only_of_rows_short_of_it():
    """vLLM's min_tokens: a row short of it cannot draw EOS (unless it ignores EOS) nor its stop token ids;
    rows past it, and rows that never asked, are untouched."""
    logits = torch.zeros(5, VOCAB)
    logits[:, 0], logits[:, 5], logits[:, 7] = 9.0, 8.0, 7.0  # EOS best, then 5, then 7
    held = Request("held", [1], SamplingParams(min_tokens=3, stop_token_ids=(5,)))
    ignoring = Request("ignoring", [1], SamplingParams(min_tokens=3, stop_token_ids=(5,), ignore_eos=True))
    past = Request("past", [1], SamplingParams(min_tokens=1, stop_token_ids=(5,)))
    past.output_token_ids.append(7)
    plain = Request("plain", [1], SamplingParams())
    many = Request("many", [1], SamplingParams(min_tokens=2, stop_token_ids=tuple(range(1, 8))))
    out = sampler().sample(logits, [held, ignoring, past, plain, many])
    assert out.token_ids[:4] == [7, 0, 0, 0] and out.token_ids[4] not in range(8)
