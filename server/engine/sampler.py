"""Next-token choice for the whole batch at once, with one device->host wait per step.

Greedy rows are exactly HF `generate(do_sample=False)`: an argmax. Sampled rows apply temperature, then
top-k, then top-p (HF's warper order) and draw with the Gumbel-max trick from their own generator, so a
seeded request gives the same tokens alone and in any batch. The backbone's forced tokens
(generation_config.forced_bos_token_id / forced_eos_token_id) are applied where HF applies them.

Fault isolation: a row whose logits are not all finite (its prefix or prompt broke the arithmetic) gets
no token and is reported as failed; the other rows are untouched. Sampling itself cannot produce NaN for
any value the API accepts: scores are shifted so the best is 0 before dividing by the temperature (so a
tiny temperature sends the others to -inf, never 0/0), the temperature is floored at MIN_TEMPERATURE
(below it float32 would round it to 0), and the most likely token always survives top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefix_store.families import FamilySpec, GenerationRules
from server.engine.request import Request

# Temperatures in (0, MIN_TEMPERATURE) are computed as MIN_TEMPERATURE: sampling among the tokens whose
# scores are within float32 rounding of the best one, i.e. greedy up to exact ties.
MIN_TEMPERATURE = 1e-30


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id, logprob), most likely first; only
    tokens the distribution can draw (finite log-probability) are listed."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampledTokens:
    """One entry per row: the chosen id, or None where the row's own numbers broke (see `failed`)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per row, where asked for

    @property
    def failed(self) -> list[int]:
        return [i for i, t in enumerate(self.token_ids) if t is None]


@dataclass
class _RowState:
    """What the sampler keeps per request across steps (on the device)."""

    generator: torch.Generator | None = None
    seen: torch.Tensor | None = (
        None  # [V] bool: the tokens HF's repetition penalty looks at before generation
    )
    counts: torch.Tensor | None = None  # [V] float32: generated tokens' occurrences


def ranking_depth(params: list, vocab: int) -> int:
    """How many of the best tokens per row `filtered_scores` must rank for these rows' top-k/top-p (from the
    host-side parameters, so no wait): top-k alone needs the k-th best score, top-p the order of the tokens
    it may keep, which top-k bounds; top-p without top-k needs the whole vocabulary in order."""
    depth = 0
    for p in params:
        k = min(p.top_k, vocab) if p.top_k > 0 else 0
        depth = max(depth, vocab if p.top_p < 1.0 and k == 0 else k)
    return depth


def filtered_scores(
    logits: torch.Tensor, temperature, top_k, top_p, depth: int | None = None
) -> torch.Tensor:
    """logits [s, V] float32 (finite), temperature/top_p [s] float32, top_k [s] long (0 = off) ->
    scores [s, V] with the tokens top-k/top-p filter out at -inf (HF's warper order: temperature, top-k, top-p).

    `depth` (see `ranking_depth`, default V) bounds the ranking: only the `depth` best tokens per row are
    put in order (a top-k instead of a sort of the whole vocabulary, which dominated sampling's cost on CPU).
    Never all -inf: the best token's score is exactly 0 whatever the temperature, and it always survives.
    """
    vocab = logits.shape[-1]
    depth = vocab if depth is None else min(depth, vocab)
    best = logits.max(dim=-1, keepdim=True).values
    scores = (logits - best).div_(temperature.clamp(min=MIN_TEMPERATURE)[:, None])  # <= 0, best == 0
    if depth == 0:  # no row filters
        return scores
    if depth * 8 >= vocab:
        ranked, order = scores.sort(dim=-1, descending=True)
    else:
        ranked, order = scores.topk(depth, dim=-1)  # sorted, descending
    # top-k as HF does it: keep every token scoring at least the k-th best (ties at the k-th included, also
    # those the ranking left out)
    kth = ranked.gather(1, (top_k.clamp(min=1, max=depth) - 1)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
    scores.masked_fill_(scores < kth, float("-inf"))
    # top-p as HF does it: drop a token when the tokens more likely than it already hold >= top_p of the mass.
    # Tokens kept but not ranked (ties with the k-th best) come after all the ranked ones.
    probs = scores.softmax(dim=-1)
    ranked_probs = probs.gather(1, order)
    more_likely = ranked_probs.cumsum(dim=-1) - ranked_probs
    applies = top_p[:, None] < 1.0
    drop_ranked = applies & (more_likely >= top_p[:, None])
    drop_ranked[:, 0] = False  # the best token always survives
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, drop_ranked)
    if (
        depth < vocab
    ):  # the unranked kept tokens all tie with the k-th best: in vocabulary order after the ranked
        tied = torch.isfinite(scores).scatter_(1, order, False)  # kept, not ranked
        before = tied.cumsum(dim=-1, dtype=torch.int32).sub_(1)  # how many of them come before this one
        more_likely = probs.mul_(before).add_(ranked_probs.sum(dim=-1, keepdim=True))  # probs: not used after
        drop |= tied & applies & (more_likely >= top_p[:, None])
    return scores.masked_fill_(drop, float("-inf"))


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
        self._rows: dict[str, _RowState] = {}

    def forget(self, request_id: str) -> None:
        self._rows.pop(request_id, None)

    def _state(self, request: Request) -> _RowState:
        state = self._rows.get(request.request_id)
        if state is None:
            state = self._rows[request.request_id] = _RowState()
        return state

    def _generator(self, request: Request) -> torch.Generator:
        state = self._state(request)
        if state.generator is None:
            state.generator = torch.Generator(device=self.device)
            if request.params.seed is not None:
                state.generator.manual_seed(request.params.seed)
            else:
                state.generator.seed()
        return state.generator

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
            for token in request.output_token_ids:  # a request that joins mid-way (never today)
                state.counts[token] += 1
        return state

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """logits [n, vocab] float32, one row per request -> one id per row (None: the row failed).

        Host work is per row (reading its parameters); device work is batched; the only device->host
        wait is the final `.tolist()`.
        """
        forced = [self._forced(r) for r in requests]
        is_finite = torch.isfinite(logits).all(dim=-1)  # [n]
        penalised = [i for i, r in enumerate(requests) if r.params.has_penalties]
        if penalised:
            logits = self._penalise(logits, requests, penalised)
        chosen = logits.argmax(dim=-1)  # [n] greedy rows
        rows = [i for i, r in enumerate(requests) if not r.params.is_greedy and forced[i] is None]
        filtered = None
        if rows:
            drawn, filtered = self._draw(logits, requests, rows)
            chosen = chosen.index_copy(0, self._as_tensor(rows), drawn)
        num_top = max((r.params.logprobs for r in requests if r.params.logprobs is not None), default=None)
        columns = [chosen[:, None].double(), is_finite[:, None].double()]
        if num_top is not None:
            columns += self._logprobs(logits, chosen, rows, filtered, num_top)
        values = torch.cat(columns, dim=1).tolist()  # the step's one device->host wait
        return self._unpack(values, requests, forced, num_top)

    def _forced(self, request: Request) -> int | None:
        """The token the backbone's generation rules force at this step (HF's ForcedBOS/ForcedEOS), if any."""
        return self.family.forced_token(
            self.rules,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            request.params.max_new_tokens,
            request.params.ignore_eos,
        )

    def _unpack(self, values, requests: list[Request], forced: list[int | None], num_top) -> SampledTokens:
        token_ids: list[int | None] = []
        logprobs: list[TokenLogprob | None] = []
        for row, request, force in zip(values, requests, forced, strict=True):
            token = None if not row[1] else force if force is not None else int(row[0])
            token_ids.append(token)
            asked = request.params.logprobs
            if token is None or asked is None or num_top is None:
                logprobs.append(None)
            elif force is not None:  # HF's forced-token processors leave a one-hot distribution
                logprobs.append(TokenLogprob(0.0, [(force, 0.0)][:asked]))
            else:
                ids, lps = row[3 : 3 + num_top], row[3 + num_top :]
                top = [
                    (int(i), lp)
                    for i, lp in zip(ids[:asked], lps[:asked], strict=True)
                    if lp != float("-inf")
                ]
                logprobs.append(TokenLogprob(row[2], top))
            if token is not None and request.params.has_penalties:
                state = self._rows[request.request_id]
                assert state.counts is not None
                state.counts[token] += 1  # a device write, no wait
        return SampledTokens(token_ids, logprobs)

    def _penalise(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        states = [self._history(requests[i], vocab) for i in rows]
        params = [requests[i].params for i in rows]
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

    def _logprobs(self, logits, chosen, rows: list[int], filtered, num_top: int) -> list[torch.Tensor]:
        """[chosen logprob [n], top ids [n, k], top logprobs [n, k]] of each row's distribution: the
        (penalised) logits for greedy rows, the temperature/top-k/top-p-filtered scores for sampled rows."""
        distribution = logits
        if rows:
            distribution = logits.index_copy(0, self._as_tensor(rows), filtered)
        logprobs = torch.log_softmax(distribution, dim=-1)
        picked = logprobs.gather(1, chosen[:, None])
        top = logprobs.topk(max(num_top, 1), dim=-1)
        values, ids = top.values[:, :num_top], top.indices[:, :num_top]
        return [picked.double(), ids.double(), values.double()]

    def _as_tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A host list as a device tensor: a host->device copy, never a wait."""
        pinned = self.device.type == "cuda"
        return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=True)

    def _draw(self, logits: torch.Tensor, requests: list[Request], rows: list[int]):
        """(sampled ids [s], filtered scores [s, V]) for the given rows: Gumbel-max over the
        temperature/top-k/top-p-filtered scores, each row drawing from its own generator."""
        params = [requests[i].params for i in rows]
        selected = logits.index_select(0, self._as_tensor(rows))
        selected = torch.nan_to_num(selected, nan=0.0, posinf=0.0, neginf=0.0)  # failed rows: result unused
        vocab = logits.shape[-1]
        scores = filtered_scores(
            selected,
            self._as_tensor([p.temperature for p in params], torch.float32),
            self._as_tensor([p.top_k for p in params]),
            self._as_tensor([p.top_p for p in params], torch.float32),
            ranking_depth(params, vocab),
        )
        uniform = torch.stack(
            [torch.rand(vocab, generator=self._generator(requests[i]), device=self.device) for i in rows]
        )
        gumbel = uniform.log_().neg_().log_().neg_()  # uniform in [0, 1): -inf at 0, never +inf
        drawn = gumbel.add_(scores).argmax(dim=-1)  # the best token is finite, so never NaN
        return drawn, scores
