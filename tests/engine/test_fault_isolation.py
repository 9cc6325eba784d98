"""A request whose own numbers break fails alone; sampling is safe for every value the API accepts;
the batched sampler waits on the device once per step; seeded sampling does not depend on the batch."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from test_cuda_graphs import padded_engine
from test_engine_exactness import device_prefix, peft_device_prefixes, run_engine

from prefix_store.families import family
from prefix_store.format import Prefix
from server.engine.backbone import GenerationRules, load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import Request, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.step import StepInput

RULES = GenerationRules(frozenset({0}), None, 0, None, None, None)


def poisoned(backbone, value: float, num_tokens: int = 4) -> Prefix:
    """A prefix the upload check would refuse (NaN, Inf): here it goes straight to the engine."""
    shape = backbone.shape
    tensor = torch.randn(shape.num_layers, 2, shape.kv_heads, num_tokens, shape.head_dim)
    tensor[:, :, :, 0] = value
    return Prefix("gpt2", {"decoder": tensor})


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)  # BART shares the runner and sampler
@pytest.mark.parametrize("padded", [False, True], ids=["eager", "graph-padded"])
def test_poisoned_rows_fail_alone_and_their_slots_are_clean_for_the_next(peft_case, padded):
    """With `padded`, decode steps run the shapes a CUDA graph replays (cuda_graphs.py, uncaptured here): pad
    rows in free slots (paged: writing the scratch block) next to poisoned ones."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    good = peft_device_prefixes(adapters)
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
    config = EngineConfig(max_num_seqs=4)
    engine = padded_engine(backbone, config) if padded else Engine(backbone, config)
    assert (engine.runner.graphs is not None) == padded
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
        [(0.7, 9, 0.8)] * 6,
        [(0.7, 9, 0.8), (1.3, 0, 0.9), (0.5, 40, 1.0), (1.0, 0, 1.0), (2.0, 3, 0.3), (0.9, 700, 0.95)],
        [(1.0, 5, 1.0), (0.8, 17, 1.0), (1.0, 0, 1.0), (1.2, 1, 0.5), (0.6, 64, 0.7), (1.0, 2, 0.99)],
        [(1.0, 2, 1.0), (1.0, 1, 0.9), (0.5, 3, 0.6), (3.0, 1, 1.0)],  # ties beyond the ranked depth
    ],
)
@pytest.mark.parametrize("vocab", [1000, 5003])  # 5,003: top_values' blocks (and a tail) for the small k
def test_top_k_and_top_p_keep_what_hf_keeps(params, vocab):
    """The kept set equals HF's warpers' (up to which of exactly tied tokens top-p cuts, an order both leave
    open), ranking the whole vocabulary or only as deep as the sampler does; where top-k keeps ties beyond the
    bounded ranking, the row says so (spill) and the sampler redoes it over the whole vocabulary."""
    from server.engine.sampler import ranked_filter, scaled_scores

    logits = torch.randn(len(params), vocab)
    logits[:, :7] = 9.0  # seven tied best tokens: a tie across the k-th best for k in 1..7
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*params, strict=True))
    scores = scaled_scores(logits, temperature.float())
    bounded = min(vocab, max(k for _, k, _ in params) + 1)  # what the sampler ranks for top-k rows
    for depth in (vocab, bounded):
        ranked, order, spill = ranked_filter(logits, temperature.float(), top_k, top_p.float(), depth)
        ours = torch.full_like(scores, float("-inf")).scatter(1, order, ranked)
        for row, (t, k, p) in enumerate(params):
            hf = hf_filtered(logits[row : row + 1], t, k, p)[0]
            if spill[row]:
                # only a tie group the ranking cut, or a row without top-k (the sampler ranks those fully)
                assert depth < vocab and (k == 0 or depth <= 7)
                continue
            kept, kept_by_hf = (logits[row][torch.isfinite(x)].sort().values for x in (ours[row], hf))
            assert torch.equal(kept, kept_by_hf), (depth, params[row])
        if depth == bounded and bounded * 8 < vocab:  # ranked by topk: the ties reach past the ranking?
            assert spill.tolist() == [k == 0 or bounded <= 7 for _, k, _ in params]


@pytest.mark.parametrize("vocab", [12, 1000, 8013, 50257])
def test_nucleus_weights_keep_what_hf_keeps(vocab):
    """top-p without a sort (the CPU path) keeps HF's set (up to which of exactly tied tokens the cut takes, an
    order HF leaves open) for peaked, flat, tied, huge-valued and -inf rows, top_p from 1e-6 to 0.999, and its
    weights are exp(score) there; a row whose cut falls deep inside a crowd of exact ties says so (spill)."""
    from server.engine.sampler import nucleus_weights, scaled_scores

    g = torch.Generator().manual_seed(vocab)
    rows = []
    for scale in (0.05, 1.0, 4.0, 30.0, 1e4):
        rows.append(torch.randn(vocab, generator=g) * scale)
    rows.append(torch.randint(0, 5, (vocab,), generator=g).float())  # five values: a crowd at the cut
    tied_top = torch.randn(vocab, generator=g)
    tied_top[: min(vocab, 20)] = 6.0  # twenty tied best tokens
    rows.append(tied_top)
    rows.append(torch.full((vocab,), 3.0))  # every token tied
    logits = torch.stack(rows)
    n = logits.shape[0]
    for top_p in (1e-6, 0.3, 0.9, 0.999):
        for temperature in (1e-40, 1e-3, 0.7, 1.0, 2.5):
            t = torch.full((n,), temperature)
            scores = scaled_scores(logits, t)
            weights, spill = nucleus_weights(scores.clone(), torch.full((n,), top_p))
            assert not bool(weights.isnan().any()), (top_p, temperature)  # -inf scores included
            crowded = {5, 7} | ({6} if vocab > 32 else set())  # rows with more ties than the exact ranking
            assert set(spill.nonzero().flatten().tolist()) <= crowded, (top_p, temperature)
            for row in range(n):
                if spill[row]:
                    continue
                if temperature < 1e-30:  # the others' scores are -inf (HF's warper gives NaN here)
                    assert bool(((weights[row] > 0) <= (logits[row] == logits[row].max())).all())
                    assert float(weights[row].sum()) >= 1.0
                    continue
                hf = hf_filtered(logits[row : row + 1], temperature, 0, top_p)[0]
                kept = weights[row] > 0
                assert torch.equal(weights[row][kept], scores[row].exp()[kept])
                # compare where exp does not underflow (there the weight is 0, and the token cannot be drawn)
                drawable = scores[row] > -80
                ours = logits[row][kept & drawable].sort().values
                theirs = logits[row][torch.isfinite(hf) & drawable].sort().values
                assert torch.equal(ours, theirs), (row, top_p, temperature)
    nan_row = torch.zeros(2, vocab)
    nan_row[0, 1] = float("nan")
    weights, _ = nucleus_weights(nan_row, torch.tensor([0.5, 0.5]))  # a failed row: no error
    assert weights.shape == (2, vocab)


def test_a_top_p_cut_inside_a_crowd_of_ties_is_redone_with_one_more_wait_only():
    vocab = 3000
    logits = torch.randn(2, vocab)
    logits[:, 100:300] = 9.0  # 200 tied best tokens: top-p 0.5 cuts inside them
    requests = sampler_rows([{"temperature": 1.0, "top_p": 0.5}, {"temperature": 1.0, "top_p": 0.5}], [1, 2])
    with count_host_syncs() as calls:
        out = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests)
    assert calls == ["tolist", "tolist"]
    assert all(100 <= t < 200 for t in out.token_ids)  # HF's cut: the lower half of the ties, by id
    logits[:, 100:300] = 9.0 + torch.arange(200.0) * 1e-3  # no ties: one wait
    with count_host_syncs() as calls:
        Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests)
    assert calls == ["tolist"]


@pytest.mark.parametrize("vocab", [64, 1000, 8000, 8013, 50257])
@pytest.mark.parametrize("depth", [1, 2, 51, 300])
def test_top_values_are_topk_values(vocab, depth):
    """The blocked ranking gives exactly topk's values (ties, repeated values, -inf, the columns past the last
    whole block included) and ids that hold them; a NaN row stays in range."""
    from server.engine.sampler import top_values

    if depth > vocab:
        return
    g = torch.Generator().manual_seed(vocab + depth)
    logits = torch.randn(6, vocab, generator=g)
    logits[1] = torch.randint(0, 4, (vocab,), generator=g).float()  # a handful of values, many ties
    logits[2, -5:] = 50.0  # the best ones past the last whole block
    logits[3, ::7] = float("-inf")
    logits[4, : vocab // 2] = 3.0
    logits[5, vocab // 3] = float("nan")
    values, ids = top_values(logits, depth)
    assert torch.equal(values[:5], logits[:5].topk(depth, dim=-1).values)
    assert torch.equal(logits.gather(1, ids)[:5], values[:5])
    assert all(len(set(row)) == depth for row in ids.tolist())  # distinct tokens
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab


@pytest.mark.parametrize("vocab", [1000, 8000, 50257])
def test_unranked_top_values_are_the_same_set(vocab):
    """ranked=False gives the same values (in any order), and ids that hold them."""
    from server.engine.sampler import top_values

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g).bfloat16().float()  # many exact ties
    values, ids = top_values(logits, 51, ranked=False)
    assert torch.equal(values.sort(dim=-1, descending=True).values, logits.topk(51, dim=-1).values)
    assert torch.equal(logits.gather(1, ids), values)


def test_by_score_then_id_is_a_stable_descending_sort_by_id():
    """The one-sort ranking is what sorting by id, then stably by value (descending) gives: ties (-0.0 and 0.0
    among them), negatives, infinities and a NaN-free row of all-equal values included."""
    from server.engine.sampler import by_score_then_id

    g = torch.Generator().manual_seed(7)
    values = torch.randint(-3, 4, (6, 40), generator=g).float() / 2
    values[1] = torch.randn(40, generator=g) * 1e30
    values[2, ::3] = float("-inf")
    values[2, 1::5] = float("inf")
    values[3] = 0.0
    values[3, ::2] = -0.0
    values[4] = torch.randn(40, generator=g) * 1e-40  # subnormals
    values[5] = -1.0
    ids = torch.stack([torch.randperm(50_000, generator=g)[:40] for _ in range(6)])
    ids[0, :5] = torch.tensor([0, 49_999, 2**32 - 1, 17, 2**31])
    by_id = ids.argsort(dim=-1)
    expected = by_id.gather(1, values.gather(1, by_id).sort(dim=-1, descending=True, stable=True).indices)
    assert torch.equal(ids.gather(1, by_score_then_id(values, ids)), ids.gather(1, expected))


def sampler_rows(params: list[dict], seeds) -> list[Request]:
    return [
        Request(f"r{i}", [1, 2], SamplingParams(max_new_tokens=8, seed=seed, **p))
        for i, (p, seed) in enumerate(zip(params, seeds, strict=True))
    ]


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8, "top_k": 5},  # hashed noise over the ranked candidates
        {"temperature": 1.3, "top_k": 6, "top_p": 0.8},
        {"temperature": 0.9, "top_p": 0.85},  # the sorted vocabulary, the request's generator
        {"temperature": 1.5},  # no ranking at all
    ],
)
@pytest.mark.parametrize("vocab", [12, 300])  # 300: the whole-vocabulary draws take the two-level search
def test_sampled_tokens_follow_hf_s_distribution(params, vocab):
    """4,000 seeds drawing from one row: the frequencies match softmax of HF's warped scores."""
    draws = 4000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    hf = hf_filtered(logits, params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0))
    expected = torch.softmax(hf[0], -1)
    requests = sampler_rows([params] * draws, range(draws))
    tokens = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits.expand(draws, -1), requests)
    counts = torch.bincount(torch.tensor(tokens.token_ids), minlength=vocab).float()
    assert counts[expected == 0].sum() == 0  # never a token HF's warpers drop
    deviation = (counts / draws - expected).abs()
    assert bool((deviation <= 4 * (expected * (1 - expected) / draws).sqrt() + 1e-3).all()), (
        counts,
        expected,
    )


@pytest.mark.parametrize("vocab", [500, 8000])  # 8,000: top_values ranks by blocks, alone and in the batch
def test_seeded_draws_do_not_depend_on_the_batch_even_inside_ties(vocab):
    """A seeded row draws the same token alone and beside rows that change the ranking depth (a larger top-k)
    or the path (no top-k), also when top-p cuts inside a group of exactly tied tokens and when its k-th best
    ties beyond its own ranking (the spill redo)."""
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5)) * 2
    logits[0, [3, 40, 41, 200, 333, 499]] = 7.0  # six exactly tied best tokens
    mine = [
        {"temperature": 1.0, "top_k": 2, "top_p": 0.4},
        {"temperature": 0.7, "top_k": 4},
        {"temperature": 1.0, "top_p": 0.03},  # top-p without top-k: nucleus_weights, its cut inside the ties
    ]
    others = [
        {"temperature": 1.0, "top_k": 60},
        {"temperature": 1.0, "top_k": 400},  # at vocab 500 a k that sorts the vocabulary: its own group
        {"temperature": 1.2},
        {"temperature": 0.9, "top_p": 0.9},
    ]
    for own in mine:
        for seed in range(20):
            alone = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(
                logits, sampler_rows([own], [seed])
            )
            batch = sampler_rows([*others, own], [7, 8, 9, 10, seed])
            together = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits.expand(5, -1), batch)
            assert alone.token_ids[0] == together.token_ids[4], (own, seed)
            assert alone.token_ids[0] in (3, 40, 41, 200, 333, 499)


def test_a_top_p_row_draws_the_same_beside_hostile_rows():
    """nucleus_weights works per row: NaN, huge, all-tied and crowded rows (which spill and are redone by a sort)
    in the same step leave a seeded top-p row's tokens as they are alone."""
    vocab = 8000
    g = torch.Generator().manual_seed(11)
    mine = torch.randn(1, vocab, generator=g) * 2
    hostile = torch.randn(5, vocab, generator=g)
    hostile[0, 7] = float("nan")
    hostile[1] *= 3e37  # huge but finite
    hostile[2] = 1.0  # every token tied: its cut spills
    hostile[3] = torch.randint(0, 3, (vocab,), generator=g).float()  # crowds of ties
    hostile[4, :4000] = float("-inf")  # not all finite: failed, as any such row
    own = {"temperature": 0.9, "top_p": 0.9}
    others = [{"temperature": 1.0, "top_p": p} for p in (0.5, 0.999, 0.3, 0.7, 1e-6)]
    for seed in range(10):
        alone = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(mine, sampler_rows([own], [seed]))
        batch = sampler_rows([*others, own], [1, 2, 3, 4, 5, seed])
        together = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(
            torch.cat([hostile, mine]), batch
        )
        assert together.token_ids[5] == alone.token_ids[0]
        assert together.failed == [0, 4]
        assert all(t is not None and 0 <= t < vocab for t in together.token_ids[1:4])


def test_a_spilling_row_is_redone_with_one_more_wait_only():
    vocab = 500
    logits = torch.randn(2, vocab) * 2
    logits[:, 10:20] = 8.0  # ten tied best tokens, beyond top_k 3's ranking of 4
    requests = sampler_rows([{"temperature": 1.0, "top_k": 3}, {"temperature": 1.0, "top_k": 3}], [1, 2])
    with count_host_syncs() as calls:
        out = Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests)
    assert calls == ["tolist", "tolist"]
    assert all(10 <= t < 20 for t in out.token_ids)
    logits[:, 10:20] = torch.arange(10.0)  # no ties: one wait
    with count_host_syncs() as calls:
        Sampler(RULES, family("gpt2"), torch.device("cpu")).sample(logits, requests)
    assert calls == ["tolist"]


def test_step_uniforms_are_splitmix64_and_draws_skip_zero_weights():
    from server.engine.sampler import inverse_cdf, step_uniform

    def splitmix64(state: int) -> int:  # the published reference (Steele et al.), one output from `state`
        z = (state + 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    for seed, step in ((0, 0), (1, 5), (2**63 - 1, 127), (12345, 1)):
        z = splitmix64((splitmix64(seed) + step * 0x9E3779B97F4A7C15) % 2**64)
        u = step_uniform(seed, step)
        assert u == ((z >> 41) + 0.5) / 2**23 and 0 < u < 1 and float(torch.tensor(u)) == u
    weights = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]] * 3 + [[float("nan")] * 6])
    picks = inverse_cdf(weights, torch.tensor([1e-7, 0.6, 1 - 2**-23, 0.5]))[:, 0].tolist()
    assert picks[:3] == [1, 1, 4] and 0 <= picks[3] < 6  # never a zero weight; a NaN row stays in range


@pytest.mark.parametrize("vocab", [100, 256, 1000, 8003, 50257])
def test_first_argmax_is_argmax(vocab):
    """The blocked argmax gives torch.argmax's index (the first of tied maxima, -inf and a best column past
    the last whole block included); a NaN row stays in range."""
    from server.engine.sampler import first_argmax

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(7, vocab, generator=g)
    logits[1] = torch.randint(0, 3, (vocab,), generator=g).float()  # many tied maxima
    logits[2, -1] = 99.0  # the best in the short last block
    logits[3, [vocab // 2, vocab // 3, vocab - 2]] = 99.0  # tied best, the first one wins
    logits[4] = float("-inf")
    logits[4, vocab // 5] = 0.0
    logits[5] = 1.0  # all tied: column 0
    logits[6, vocab // 4] = float("nan")
    picks = first_argmax(logits)
    assert torch.equal(picks[:6], logits[:6].argmax(dim=-1))
    assert 0 <= int(picks[6]) < vocab


@pytest.mark.parametrize("vocab", [256, 1000, 8003])
def test_two_level_inverse_cdf_picks_what_one_cumulative_sum_picks(vocab):
    """Integer weights (sums exact in float32): the blocked search picks exactly the index the flat one does,
    for uniforms across (0, 1), zero-weight blocks and a short last block included."""
    from server.engine.sampler import inverse_cdf

    g = torch.Generator().manual_seed(vocab)
    weights = torch.randint(0, 5, (1, vocab), generator=g).float()
    weights[0, 64:200] = 0.0  # whole blocks of zero weight
    weights[0, -3:] = 7.0  # the short last block is reachable
    uniform = (torch.arange(4000) + 0.5) / 4000
    picks = inverse_cdf(weights.expand(4000, -1), uniform)[:, 0]
    cumulative = weights[0].cumsum(0)
    flat = torch.searchsorted(cumulative, uniform * cumulative[-1], right=True)
    assert torch.equal(picks, flat)
    assert bool((weights[0, picks] > 0).all())
    broken = inverse_cdf(torch.full((1, vocab), float("nan")), torch.tensor([0.5]))
    assert 0 <= int(broken) < vocab  # a failed (NaN) row still gets an index in range


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
    runner = ModelRunner(backbone, EngineConfig(max_num_seqs=8, max_model_len=128, max_prefix_tokens=16))
    mix = [
        SamplingParams(max_new_tokens=20),
        SamplingParams(max_new_tokens=20, temperature=0.9),
        SamplingParams(max_new_tokens=20, temperature=0.9, seed=5),
        SamplingParams(max_new_tokens=20, temperature=1.2, top_k=5, top_p=0.9, seed=6),
        SamplingParams(max_new_tokens=20, temperature=1e-40),
    ]
    requests = [Request(f"r{i}", [5, 6, 7 + i], p, row=i) for i, p in enumerate(mix)]
    runner.execute(StepInput(prefill=requests, decode=[], finished=[]))
    for _ in range(3):
        with count_host_syncs() as calls:
            out = runner.execute(StepInput(prefill=[], decode=requests, finished=[])).tokens(requests)
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
