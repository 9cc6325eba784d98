"""Next-token choice for the whole batch at once, with one device->host wait per step.

The rows' parameters come as arrays (RowView: slices of the runner's persistent batch) and are grouped by
masks; only rows with penalties, logprobs or a forced token are visited one by one. vLLM's min_tokens masks
EOS and stop token ids of the rows short of it, found by comparing arrays.

Greedy rows are exactly HF `generate(do_sample=False)`: an argmax. Sampled rows apply temperature, then
top-k, then top-p (HF's warper order and keep rules, ties at the k-th best included) and draw by inverse
CDF (below). The backbone's forced tokens (generation_config.forced_bos_token_id / forced_eos_token_id)
are applied where HF applies them (the family spec says where).

Cost: a row with top-k ranks only its k best tokens (`top_values`: topk over blocks, not a sort of the
vocabulary: the sort was most of sampling's host time on CPU) and draws among them; top-p without top-k finds
its cut by a mass histogram on CPU (`nucleus_weights`, no sort) and sorts the vocabulary on CUDA; temperature alone
ranks nothing. Each row's figures are computed the same way whatever else is in the batch (sums run in rank
order, so a deeper ranking for another row's larger k changes nothing; histograms per row).

Drawing is by inverse CDF: one uniform per row and step, a hash (splitmix64) of the request's seed and the
step computed on the host, against the cumulative weights of what the row keeps (in rank order, ties by token
id; in token-id order for temperature alone and for top-p without top-k on CPU). No generator state: a seeded
request gives the same tokens alone and in any batch (bit for bit on CPU, where cumulative sums run in order).
In the rare step where a top-k row's k-th best score ties exactly with tokens beyond the ranking (HF keeps them
all; bfloat16 logits tie often), or a top-p row's cut falls among many exactly tied tokens, that row is redone
over the sorted vocabulary after the step's wait: a second wait in that step only.

Fault isolation: a row whose logits are not all finite (its prefix or prompt broke the arithmetic) gets
no token and is reported as failed; the other rows are untouched (all arithmetic is per row). Sampling
itself cannot produce NaN for any value the API accepts: scores are shifted so the best is 0 before
dividing by the temperature (so a tiny temperature sends the others to -inf, never 0/0), the temperature is
floored at MIN_TEMPERATURE (below it float32 would round it to 0), and the best token always survives
top-k/top-p.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from prefix_store.families import FamilySpec, GenerationRules
from server.engine.request import Request
from server.engine.step import TokenLogprob, put_ids

# Temperatures in (0, MIN_TEMPERATURE) are computed as MIN_TEMPERATURE: sampling among the tokens whose
# scores are within float32 rounding of the best one, i.e. greedy up to exact ties.
MIN_TEMPERATURE = 1e-30

NEG_INF = float("-inf")
_CDF_BLOCK = 64  # weights per block in inverse_cdf's first level
_ARGMAX_BLOCK = 64  # columns per block in first_argmax
_MASK64 = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SYSTEM_RANDOM = random.SystemRandom()


def _mix64(z: int) -> int:
    """splitmix64's finaliser (64-bit, on Python ints)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def step_uniform(seed: int, step: int) -> float:
    """A request's uniform in (0, 1) for generated token `step`: splitmix64 of (seed, step), 23 bits (exact in
    float32, never 0 or 1)."""
    return _keyed_uniform(seed_key(seed), step)


def seed_key(seed: int) -> int:
    """The half of step_uniform that depends on the seed alone (kept per request)."""
    return _mix64((seed + _GOLDEN) & _MASK64)


def _keyed_uniform(key: int, step: int) -> float:
    z = _mix64((key + (step + 1) * _GOLDEN) & _MASK64)
    return ((z >> 41) + 0.5) / 2**23


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """weights [s, m] >= 0 (a positive one in each row), uniform [s] in (0, 1) -> [s, 1] the index whose
    cumulative weight first exceeds uniform * total: a draw proportional to the weights, never a zero weight.
    A row of NaN (failed; its result is unused) gets a valid index too.

    Over a whole vocabulary the cumulative sum (sequential per row, the costliest step on CPU) runs in two
    levels: over blocks of _CDF_BLOCK weights' sums to find the block, then inside that block only."""
    m = weights.shape[-1]
    if m < 4 * _CDF_BLOCK:
        cumulative = weights.cumsum(dim=-1)
        return _search(cumulative, uniform[:, None] * cumulative[:, -1:])
    cumulative = _block_reduce(weights, _CDF_BLOCK, torch.sum).cumsum(dim=-1)
    target = _below_total(cumulative, uniform[:, None] * cumulative[:, -1:])
    block = _search(cumulative, target)
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp_(min=0)), 0.0)
    pick = _search(_block_members(weights, block, _CDF_BLOCK, 0.0).cumsum(dim=-1), target - before)
    return (block * _CDF_BLOCK + pick).clamp_(max=m - 1)


def _block_reduce(x: torch.Tensor, size: int, reduce) -> torch.Tensor:
    """x [s, V] -> [s, ceil(V / size)]: `reduce` (torch.sum, torch.amax) over each block of `size` consecutive
    columns, the last block shorter when V is not a multiple of it."""
    rows, vocab = x.shape
    span = vocab // size * size
    out = reduce(x[:, :span].view(rows, -1, size), dim=-1)
    if span < vocab:
        out = torch.cat([out, reduce(x[:, span:], dim=-1, keepdim=True)], dim=1)
    return out


def _block_members(x: torch.Tensor, block: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """x [s, V], block [s, 1] -> [s, size] the columns of each row's block (`fill` past the last column)."""
    columns = block * size + torch.arange(size, device=x.device)
    return x.gather(1, columns.clamp(max=x.shape[-1] - 1)).masked_fill_(columns >= x.shape[-1], fill)


def _below_total(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """target [s, 1] kept below the row's total (float rounding of u * total)."""
    total = cumulative[:, -1:]
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


def _search(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cumulative [s, m] weights' running sums -> [s, 1] the first index whose sum exceeds target [s, 1],
    kept below the total: the index holds a positive weight."""
    target = _below_total(cumulative, target)
    return torch.searchsorted(cumulative, target, right=True).clamp_(max=cumulative.shape[-1] - 1)


@dataclass
class SampledTokens:
    """One entry per row: the chosen id, or None where the row's own numbers broke (see `failed`)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per row, where asked for

    @property
    def failed(self) -> list[int]:
        return [i for i, t in enumerate(self.token_ids) if t is None]


@dataclass
class RowView:
    """The rows of one sample call as arrays (the runner's persistent batch, sliced: no loop over rows to
    build it). `steps`: tokens each row generated before this one; `forced`: row -> the token the family's
    rules force at this step (rows at their first or last step only)."""

    requests: list[Request]
    temperature: np.ndarray  # [s] float32
    top_k: np.ndarray  # [s] int64
    top_p: np.ndarray  # [s] float32
    keys: np.ndarray  # [s] uint64: seed_key of each row's seed
    steps: np.ndarray  # [s] int64
    has_penalties: np.ndarray  # [s] bool
    logprobs: np.ndarray  # [s] int64: alternatives asked for, -1 = no logprobs
    min_tokens: np.ndarray  # [s] int64: vLLM's min_tokens (0: none)
    ignore_eos: np.ndarray  # [s] bool
    stop_ids: np.ndarray  # [s, w] int64: stop_token_ids, -1 padded (read only for rows short of min_tokens)
    forced: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class RowsSampled:
    """sample_rows' answer: token ids [s] (meaningless where failed), failed [s] bool, logprobs by row."""

    token_ids: np.ndarray
    failed: np.ndarray
    logprobs: dict[int, TokenLogprob]


def keyed_uniforms(keys: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """_keyed_uniform for arrays of keys (uint64) and steps: the same splitmix64 on uint64 lanes (wrapping)."""
    z = keys + (steps.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(41)).astype(np.float64) + 0.5) / 2**23


@dataclass
class _RowState:
    """What the sampler keeps per request across steps (on the device)."""

    seed: int = 0
    key: int = 0  # seed_key(seed)
    seen: torch.Tensor | None = (
        None  # [V] bool: the tokens HF's repetition penalty looks at before generation
    )
    counts: torch.Tensor | None = None  # [V] float32: generated tokens' occurrences


def scaled_scores(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [s, V] -> (logits - best) / temperature: <= 0, the best exactly 0 whatever the temperature."""
    best = logits.amax(dim=-1, keepdim=True)
    return (logits - best).div_(temperature.clamp(min=MIN_TEMPERATURE)[:, None])


def top_values(x: torch.Tensor, depth: int, ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [s, V] -> (the `depth` largest values of each row, descending (in no order when not `ranked`); their ids):
    `x.topk(depth)`'s values exactly (ties in any order), cheaper when depth << V. The columns are cut into blocks;
    every one of a row's `depth` best values lies in one of the `depth` blocks with the largest maxima (a value
    outside them is at most the smallest of those maxima, so `depth` values are at least as large), so topk runs
    over the blocks' maxima, then over those blocks' members (and the few columns past the last whole block) only.

    topk's cost on CPU is its elements (a branchy selection), so blocks of ~sqrt(V / depth) columns balance the
    two stages (V / block maxima, depth * block members): the least work (and, at 64 rows x 8,000, each stage
    wide enough for ATen to split the rows over two threads, which a 16-column block's 500 maxima were not)."""
    rows, vocab = x.shape
    block = round(math.sqrt(vocab / depth))
    num_blocks = vocab // max(block, 1)
    if block < 2 or num_blocks < 4 * depth:
        return x.topk(depth, dim=-1, sorted=ranked)
    span = num_blocks * block
    # block j holds columns j, j + num_blocks, ...: the max over a middle dimension vectorises
    maxima = x[:, :span].view(rows, block, num_blocks).amax(dim=1)
    best_maxima, blocks = maxima.topk(depth, dim=-1, sorted=False)
    members = (blocks[:, :, None] + torch.arange(0, span, num_blocks, device=x.device)).view(rows, -1)
    tail = torch.arange(span, vocab, device=x.device).expand(rows, -1)
    ids = torch.cat([members, tail], dim=1)
    # members below the smallest of those maxima cannot rank (`depth` maxima are at least as large): sent to -inf,
    # they make topk's comparisons predictable (cheaper on CPU); the result is the same
    candidates = x.gather(1, ids)
    candidates.masked_fill_(candidates < best_maxima.amin(dim=-1, keepdim=True), NEG_INF)
    values, where = candidates.topk(depth, dim=-1, sorted=ranked)
    return values, ids.gather(1, where)


def by_score_then_id(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values [s, m] float32, ids [s, m] (0 <= id < 2**32) -> the permutation [s, m] that ranks each row by value,
    descending, ties by id, ascending (what a stable sort of the vocabulary gives): one sort of int64 keys, the
    value's bits made monotone (the sign flips the order of the rest) over the inverted id. -0.0 ranks as 0.0."""
    bits = (values + 0.0).view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = monotone.long().mul_(1 << 32).add_((1 << 32) - 1 - ids)
    return key.argsort(dim=-1, descending=True)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [s, V] -> [s] `x.argmax(dim=-1)` (the first of tied maxima), in two levels: the first block of
    _ARGMAX_BLOCK columns whose max is the row's max, then the first max inside it (argmax over the whole row is
    not vectorised on CPU). Rows with NaN get an index in range."""
    vocab = x.shape[-1]
    if vocab < 4 * _ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    block = _block_reduce(x, _ARGMAX_BLOCK, torch.amax).argmax(dim=-1, keepdim=True)
    inside = _block_members(x, block, _ARGMAX_BLOCK, NEG_INF).argmax(dim=-1)
    return (block[:, 0] * _ARGMAX_BLOCK + inside).clamp_(max=vocab - 1)


def ranked_filter(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [s, V], temperature [s], top_k [s] long (0 = off), top_p [s] float32 ->
    (ranked [s, m]: the m best scaled_scores per row, descending, those top-k/top-p drop at -inf; their ids
    [s, m]; spill [s] bool: top-k may keep tokens beyond the ranking, ties with the k-th best: redo with depth V).

    m = depth, or V when depth >= V / 8 (then a full sort is cheaper than topk). HF's rules: top-k keeps every
    token scoring at least the k-th best; top-p drops a token when the tokens ranked before it already hold
    >= top_p of the kept mass (the best always survives). Sums run in rank order (cumsum), so a row's result
    does not depend on m as long as m covers what it keeps. A partial ranking picks on the raw logits (scaling
    keeps the order) and scales only what it picked: the same numbers as scaled_scores, elementwise.
    """
    vocab = logits.shape[-1]
    if depth * 8 >= vocab:
        scores = scaled_scores(logits, temperature)
        ranked, order = scores.sort(dim=-1, descending=True, stable=True)  # ties in id order
    else:
        best, order = top_values(logits, depth, ranked=False)
        ranked = (best - best.amax(dim=-1, keepdim=True)).div_(
            temperature.clamp(min=MIN_TEMPERATURE)[:, None]
        )
        # the same order a stable sort gives (ties in id order): top-p's cut inside a tie group, and so a
        # seeded draw, must not depend on how deep the ranking went (scaling can also make new ties)
        rank = by_score_then_id(ranked, order)
        ranked, order = ranked.gather(1, rank), order.gather(1, rank)
    m = ranked.shape[-1]
    kth = ranked.gather(1, (top_k.clamp(min=1, max=m) - 1)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, NEG_INF)
    ranked = ranked.masked_fill(ranked < kth, NEG_INF)
    spill = ranked[:, -1] > NEG_INF if m < vocab else torch.zeros_like(top_k, dtype=torch.bool)
    weights = ranked.exp()  # the best is 1, dropped 0
    cumulative = weights.cumsum(dim=-1)
    more_likely = (cumulative - weights).div_(cumulative[:, -1:])
    drop = (top_p[:, None] < 1.0) & (more_likely >= top_p[:, None])
    drop[:, 0] = False
    return ranked.masked_fill_(drop, NEG_INF), order, spill


_NUCLEUS_BINS = 8192  # nucleus_weights' histogram bins per row
_NUCLEUS_SPAN = 32.0  # the bins cover at most scores in [-_NUCLEUS_SPAN, 0]; lower ones share the last
_NUCLEUS_MEMBERS = 32  # tokens of the cut's bin ranked exactly; a cut deeper among them spills


def nucleus_weights(
    scores: torch.Tensor, top_p: torch.Tensor, every_row_cuts: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [s, V] (scaled_scores: <= 0, the best 0), top_p [s] -> (weights [s, V]: exp(scores) where top-p keeps
    the token by HF's rule, ranked by score with ties in id order (the set ranked_filter keeps), else 0; spill [s]
    bool: the cut falls below the _NUCLEUS_MEMBERS best tokens of a crowded bin (exact ties, mostly): redo the row
    by a sort). `every_row_cuts`: no row has top_p >= 1 (those keep everything).

    Without sorting the vocabulary (a full sort was most of a top-p step on CPU). A token is kept when the tokens ranked before it hold less than top_p of the mass, so the kept set
    is the ranking down to one token, the last kept. A mass histogram by score (_NUCLEUS_BINS bins over the
    row's range of scores, at most _NUCLEUS_SPAN) finds the bin holding it: every token in a better bin is kept,
    every one in a worse bin dropped; the best tokens of that bin are ranked exactly (score, then id) with the
    mass before them, which gives the last kept token. Sums run per row (bins in index order), so a row's result
    does not depend on the batch. A NaN row stays in range."""
    rows, vocab = scores.shape
    bins, members = _NUCLEUS_BINS, min(_NUCLEUS_MEMBERS, vocab)
    # (masks by multiplying or a sign: comparisons into bool tensors, and masked_fill, cost several times more on CPU)
    exp = scores.exp()  # the best 1
    lowest = scores.amin(dim=-1, keepdim=True).clamp_(min=-_NUCLEUS_SPAN, max=-1e-30)
    scale = lowest.reciprocal_().mul_(bins - 1)  # < 0: the best in bin 0, the lowest in the last
    # monotone in the score; NaN (a failed row) to an index in range
    index = scores.mul(scale).clamp_(max=bins - 1).long().clamp_(min=0)
    cumulative = torch.zeros(rows, bins, device=scores.device).scatter_add_(1, index, exp).cumsum_(dim=-1)
    target = top_p[:, None] * cumulative[:, -1:]
    # mass in the better bins (shifted sums: an empty bin adds exactly nothing, so the last bin with less than
    # `target` ahead of it is not empty)
    ahead = torch.cat([torch.zeros(rows, 1, device=scores.device), cumulative[:, :-1]], dim=1)
    cut = torch.searchsorted(ahead, target).sub_(1).clamp_(0, bins - 1)  # bin 0 holds the best: always one
    # the cut bin's best tokens ranked exactly: score, then id (the others' keys pushed below any score)
    values, ids = top_values(torch.where(index == cut, scores, -1e30), members, ranked=False)
    rank = by_score_then_id(values, ids)
    values, ids = values.gather(1, rank), ids.gather(1, rank)
    member = values > -1e29
    mass = values.exp()  # 0 for the others
    kept = ((mass.cumsum(dim=-1) - mass + ahead.gather(1, cut)) < target) & member
    last = kept.sum(dim=-1, keepdim=True).sub_(1).clamp_(min=0)
    last_value = values.gather(1, last)
    # every token scoring at least the last kept one, but for its ties ranked after it (higher ids): all ranked
    # here unless the ranking ends at that value (then the row spills)
    # exp * (scores >= last_value), a quarter of the cost: last_value is finite (the cut bin holds mass), and a
    # difference of floats is 0 only for equal ones
    weights = (scores - last_value).sign_().add_(1.0).clamp_(max=1.0).mul_(exp)
    tied_after = (values == last_value) & (torch.arange(members, device=scores.device) > last)
    weights.scatter_(1, ids, weights.gather(1, ids).masked_fill_(tied_after, 0.0))
    spill = member[:, -1] & (last_value[:, 0] <= values[:, -1]) & (members < vocab)
    if not every_row_cuts:
        everything = top_p >= 1.0
        weights = torch.where(everything[:, None], exp, weights)
        spill &= ~everything
    return weights, spill


@dataclass
class _Drawn:
    """One group of sampled rows: their draws [s] and, where asked, log-probabilities of what they drew from."""

    rows: list[int]
    tokens: torch.Tensor
    spill: torch.Tensor | None = None  # [s] bool: rows to redo with `redo`
    logprobs: list[torch.Tensor] | None = None  # [picked [s, 1], top ids [s, T], top logprobs [s, T]]
    redo: Callable[[list[int]], _Drawn] | None = None  # rows (batch indices) -> their draws over a sort


def ranked_logprobs(ranked, order, pick, num_top: int) -> list[torch.Tensor]:
    """Log-probabilities of a ranked, filtered distribution: [picked [s, 1], top ids [s, T], top lps [s, T]]."""
    logprobs = ranked - ranked.logsumexp(dim=-1, keepdim=True)
    width = min(num_top, ranked.shape[-1])
    ids, values = order[:, :width], logprobs[:, :width]
    if width < num_top:  # fewer ranked tokens than alternatives asked for: the rest cannot be drawn
        pad = num_top - width
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1)
        values = torch.cat([values, values.new_full((values.shape[0], pad), NEG_INF)], dim=1)
    return [logprobs.gather(1, pick), ids, values]


def full_logprobs(distribution, tokens, num_top: int) -> list[torch.Tensor]:
    """Log-probabilities of a whole-vocabulary distribution [s, V]."""
    logprobs = torch.log_softmax(distribution, dim=-1)
    top = logprobs.topk(max(num_top, 1), dim=-1)
    return [logprobs.gather(1, tokens[:, None]), top.indices[:, :num_top], top.values[:, :num_top]]


def apply_penalties(logits: torch.Tensor, seen, counts, repetition, presence, frequency) -> torch.Tensor:
    """logits [s, V] -> penalised logits. seen [s, V] bool (prompt or generated: HF's input_ids), counts [s, V]
    (generated occurrences), penalties [s]. HF's repetition penalty, then OpenAI's presence/frequency."""
    repeated = seen | (counts > 0)
    penalty = repetition[:, None]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(repeated, penalised, logits)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


class Sampler:
    def __init__(self, rules: GenerationRules, family: FamilySpec, device: torch.device):
        self.rules = rules
        self.family = family
        self.is_encoder_decoder = family.is_encoder_decoder
        self.device = device
        self._eos = np.array(sorted(rules.eos_token_ids), dtype=np.int64)
        self._rows: dict[str, _RowState] = {}

    def forget(self, request_id: str) -> None:
        self._rows.pop(request_id, None)

    def key(self, request: Request) -> int:
        """The request's seed_key (an unseeded request draws its seed here, once)."""
        return self._state(request).key

    def _state(self, request: Request) -> _RowState:
        state = self._rows.get(request.request_id)
        if state is None:
            seed = request.params.seed
            seed = seed if seed is not None else _SYSTEM_RANDOM.getrandbits(63)
            state = _RowState(seed=seed, key=seed_key(seed))
            self._rows[request.request_id] = state
        return state

    def _history(self, request: Request, vocab: int) -> _RowState:
        """The request's penalty history; the first time: what HF's input_ids hold before generation."""
        state = self._state(request)
        if state.seen is None:
            # decoder-only: the prompt; encoder-decoder: the decoder input, i.e. the start token
            before = (
                [self.rules.decoder_start_token_id or 0]
                if self.is_encoder_decoder
                else request.prompt_token_ids
            )
            state.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            state.seen[self._as_tensor([t for t in before if 0 <= t < vocab])] = True
            state.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            for token in request.output_token_ids:  # a request that joins mid-way (tests; never the engine)
                state.counts[token] += 1
        return state

    def rows_of(self, requests: list[Request], steps: list[int] | None = None) -> RowView:
        """A RowView built from requests (tests, beam-mixed steps); `steps` defaults to their output lengths."""
        params = [r.params for r in requests]
        steps = [len(r.output_token_ids) for r in requests] if steps is None else steps
        view = RowView(
            requests,
            np.array([p.temperature for p in params], dtype=np.float32),
            np.array([p.top_k for p in params], dtype=np.int64),
            np.array([p.top_p for p in params], dtype=np.float32),
            np.array([self.key(r) for r in requests], dtype=np.uint64),
            np.array(steps, dtype=np.int64),
            np.array([p.has_penalties for p in params], dtype=bool),
            np.array([-1 if p.logprobs is None else p.logprobs for p in params], dtype=np.int64),
            np.array([p.min_tokens for p in params], dtype=np.int64),
            np.array([p.ignore_eos for p in params], dtype=bool),
            np.full((len(requests), 1), -1, dtype=np.int64),
        )
        for i, request in enumerate(requests):
            view.stop_ids = put_ids(view.stop_ids, i, request.params.stop_token_ids)
            force = self.family.forced_token(
                self.rules,
                len(request.prompt_token_ids),
                steps[i],
                request.params.max_new_tokens,
                request.params.ignore_eos,
            )
            if force is not None:
                view.forced[i] = force
        return view

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """sample_rows for a list of requests (tests): one id per row, None where the row failed."""
        out = self.sample_rows(logits, self.rows_of(requests))
        ids = out.token_ids.tolist()
        return SampledTokens(
            [None if bad else ids[i] for i, bad in enumerate(out.failed.tolist())],
            [out.logprobs.get(i) for i in range(len(requests))],
        )

    def sample_rows(self, logits: torch.Tensor, view: RowView) -> RowsSampled:
        """logits [n, vocab] float32, one row per row of `view` -> one id per row (and which failed).

        The rows are grouped by array operations; only rows that ask for penalties, logprobs or a forced
        token are visited one by one. Device work is batched; the only device->host wait is the final
        `.tolist()` (a second one only in a step where a row spills, see above).
        """
        # NaN propagates through amax/amin (vectorised reductions, far cheaper than isfinite().all() on CPU)
        is_finite = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))  # [n]
        penalised = np.flatnonzero(view.has_penalties)
        if penalised.size:
            logits = self._penalise(logits, view, penalised.tolist())
        held = np.flatnonzero(view.steps < view.min_tokens)
        if held.size:
            logits = self._hold_stops(logits, view, held)
        asking = view.logprobs >= 0
        num_top = int(view.logprobs.max()) if asking.any() else None
        is_sampled = view.temperature != 0
        if view.forced:
            is_sampled[list(view.forced)] = False
        vocab = logits.shape[-1]
        # top-k rows whose ranking is cheap (topk) apart from those whose k asks for a sort anyway, so that one
        # request's huge top_k does not make every other top-k row sort the vocabulary
        with_k = is_sampled & (view.top_k > 0)
        few = (np.minimum(view.top_k, vocab) + 1) * 8 < vocab
        groups = []
        if top_k_rows := np.flatnonzero(with_k & few).tolist():
            groups.append(self._draw_top_k(logits, view, top_k_rows, num_top))
        if top_k_sorted := np.flatnonzero(with_k & ~few).tolist():
            groups.append(self._draw_top_k(logits, view, top_k_sorted, num_top, whole=True))
        if other_rows := np.flatnonzero(is_sampled & (view.top_k <= 0)).tolist():
            groups.append(self._draw_whole(logits, view, other_rows, num_top))
        values = self._gather(logits, is_finite, groups, num_top)
        spilled = set(np.flatnonzero((values[:, 2] != 0) & (values[:, 1] != 0)).tolist())
        if spilled:
            # rows a bounded ranking could not settle (top-k: ties with the k-th best beyond it; top-p: the cut
            # among many tied tokens): redone over the sorted vocabulary, their draws replacing the first ones
            groups += [
                g.redo(rows) for g in groups if g.redo and (rows := sorted(spilled.intersection(g.rows)))
            ]
            values = self._gather(logits, is_finite, groups, num_top)
        return self._unpack(values, view, num_top)

    def _gather(self, logits, is_finite, groups: list[_Drawn], num_top: int | None) -> np.ndarray:
        """The step's columns [token, finite, spilled, (logprob, top ids, top logprobs)] for every row, read
        back in one wait."""
        n = logits.shape[0]
        if len(groups) == 1 and len(groups[0].rows) == n:
            chosen = groups[0].tokens
        else:
            chosen = first_argmax(logits)  # greedy rows (and forced ones: replaced on the host)
            for g in groups:
                chosen = chosen.index_copy(0, self._as_tensor(g.rows), g.tokens)
        spill = torch.zeros(n, dtype=torch.bool, device=logits.device)
        for g in groups:
            if g.spill is not None:
                spill = spill.index_copy(0, self._as_tensor(g.rows), g.spill)
        columns = [chosen[:, None].double(), is_finite[:, None].double(), spill[:, None].double()]
        if num_top is not None:
            parts = full_logprobs(logits, chosen, num_top)  # greedy rows' distribution: the logits
            for g in groups:
                assert g.logprobs is not None
                index = self._as_tensor(g.rows)
                parts = [
                    whole.index_copy(0, index, own) for whole, own in zip(parts, g.logprobs, strict=True)
                ]
            columns += [part.double() for part in parts]
        width = sum(c.shape[1] for c in columns)
        flat = torch.cat(columns, dim=1).view(-1).tolist()  # the step's device->host wait
        return np.array(flat, dtype=np.float64).reshape(n, width)

    def _selected(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return logits if len(rows) == logits.shape[0] else logits.index_select(0, self._as_tensor(rows))

    def _uniforms(self, view: RowView, rows: list[int]) -> torch.Tensor:
        """[s] this step's uniform of each row (host arithmetic on arrays, one small copy)."""
        return self._from_numpy(keyed_uniforms(view.keys[rows], view.steps[rows]).astype(np.float32))

    def _draw_top_k(self, logits, view: RowView, rows: list[int], num_top, whole: bool = False) -> _Drawn:
        """Rows with top-k: rank each row's k best (+1, to see a tie beyond), filter, and draw among them.
        Rows with non-finite logits compute NaN in their own row."""
        vocab = logits.shape[-1]
        top_k = view.top_k[rows]
        depth = vocab if whole else min(vocab, int(top_k.max()) + 1)
        ranked, order, spill = ranked_filter(
            self._selected(logits, rows),
            self._from_numpy(view.temperature[rows]),
            self._from_numpy(top_k),
            self._from_numpy(view.top_p[rows]),
            depth,
        )
        pick = inverse_cdf(ranked.exp(), self._uniforms(view, rows))
        tokens = order.gather(1, pick)[:, 0]
        logprobs = None if num_top is None else ranked_logprobs(ranked, order, pick, num_top)

        def redo(spilled: list[int]) -> _Drawn:
            return self._draw_top_k(logits, view, spilled, num_top, whole=True)

        return _Drawn(rows, tokens, spill, logprobs, None if whole else redo)

    def _draw_whole(self, logits, view: RowView, rows: list[int], num_top, sort: bool = False) -> _Drawn:
        """Rows without top-k: temperature, and top-p. On CPU top-p's kept set comes from nucleus_weights and the
        draw runs in token-id order; on CUDA (where a sort is cheap, and scatter_add's float sums are not
        deterministic) and for nucleus_weights' spilled rows (`sort`) over the sorted vocabulary, in rank order."""
        temperature = self._from_numpy(view.temperature[rows])
        vocab = logits.shape[-1]
        selected = self._selected(logits, rows)
        uniform = self._uniforms(view, rows)
        cuts = view.top_p[rows] < 1.0
        if not cuts.any():
            scores = scaled_scores(selected, temperature)
            tokens = inverse_cdf(scores.exp(), uniform)[:, 0]  # token-id order
            logprobs = None if num_top is None else full_logprobs(scores, tokens, num_top)
            return _Drawn(rows, tokens, None, logprobs)
        top_p = self._from_numpy(view.top_p[rows])
        if sort or self.device.type != "cpu":
            zero_k = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
            ranked, order, _ = ranked_filter(selected, temperature, zero_k, top_p, vocab)
            pick = inverse_cdf(ranked.exp(), uniform)
            tokens = order.gather(1, pick)[:, 0]
            logprobs = None if num_top is None else ranked_logprobs(ranked, order, pick, num_top)
            return _Drawn(rows, tokens, None, logprobs)
        scores = scaled_scores(selected, temperature)
        weights, spill = nucleus_weights(scores, top_p, bool(cuts.all()))
        tokens = inverse_cdf(weights, uniform)[:, 0]  # token-id order
        logprobs = None
        if num_top is not None:  # what can be drawn: the kept tokens whose weight is not 0 in float32
            logprobs = full_logprobs(scores.masked_fill_(weights == 0, NEG_INF), tokens, num_top)

        def redo(spilled: list[int]) -> _Drawn:
            return self._draw_whole(logits, view, spilled, num_top, sort=True)

        return _Drawn(rows, tokens, spill, logprobs, redo)

    def _unpack(self, values: np.ndarray, view: RowView, num_top: int | None) -> RowsSampled:
        """The read-back columns as arrays; rows with a forced token, logprobs or penalties one by one."""
        token_ids = values[:, 0].astype(np.int64)
        failed = values[:, 1] == 0
        for row, force in view.forced.items():
            token_ids[row] = force
        logprobs: dict[int, TokenLogprob] = {}
        if num_top is not None:
            for row in np.flatnonzero((view.logprobs >= 0) & ~failed).tolist():
                logprobs[row] = self._logprob(
                    values[row], int(view.logprobs[row]), num_top, view.forced.get(row)
                )
        for row in np.flatnonzero(view.has_penalties & ~failed).tolist():
            state = self._rows[view.requests[row].request_id]
            assert state.counts is not None
            state.counts[int(token_ids[row])] += 1  # a device write, no wait
        return RowsSampled(token_ids, failed, logprobs)

    @staticmethod
    def _logprob(values: np.ndarray, asked: int, num_top: int, force: int | None) -> TokenLogprob:
        if force is not None:  # HF's forced-token processors leave a one-hot distribution
            return TokenLogprob(0.0, [(force, 0.0)][:asked])
        ids, lps = values[4 : 4 + num_top].tolist(), values[4 + num_top :].tolist()
        top = [(int(i), lp) for i, lp in zip(ids[:asked], lps[:asked], strict=True) if lp != NEG_INF]
        return TokenLogprob(float(values[3]), top)

    def _penalise(self, logits: torch.Tensor, view: RowView, rows: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        states = [self._history(view.requests[i], vocab) for i in rows]
        params = [view.requests[i].params for i in rows]
        index = self._as_tensor(rows)
        penalised = apply_penalties(
            logits.index_select(0, index),
            torch.stack([s.seen for s in states]),  # type: ignore[misc]
            torch.stack([s.counts for s in states]),  # type: ignore[misc]
            self._as_tensor([p.repetition_penalty for p in params], torch.float32),
            self._as_tensor([p.presence_penalty for p in params], torch.float32),
            self._as_tensor([p.frequency_penalty for p in params], torch.float32),
        )
        return logits.index_copy(0, index, penalised)

    def _hold_stops(self, logits: torch.Tensor, view: RowView, held: np.ndarray) -> torch.Tensor:
        """vLLM's min_tokens (HF's min_new_tokens): a row short of its minimum cannot end, so its EOS (unless it
        ignores EOS) and its stop token ids are masked. `held`: those rows; the cells are found by arrays."""
        eos = np.where(view.ignore_eos[held, None], -1, self._eos[None, :])  # [h, e]
        cells = np.concatenate([view.stop_ids[held], eos], axis=1)
        rows, columns = np.nonzero((cells >= 0) & (cells < logits.shape[-1]))
        if not rows.size:
            return logits
        index = (self._as_tensor(held[rows].tolist()), self._as_tensor(cells[rows, columns].tolist()))
        return logits.index_put(index, logits.new_tensor(NEG_INF))

    def _as_tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A host list as a device tensor: a host->device copy, never a wait."""
        pinned = self.device.type == "cuda"
        return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=True)

    def _from_numpy(self, values: np.ndarray) -> torch.Tensor:
        """A host array as a device tensor (int64 -> long, float32 -> float32): a copy, never a wait."""
        host = torch.from_numpy(np.ascontiguousarray(values))
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.clone() if self.device.type == "cpu" else host.to(self.device)
