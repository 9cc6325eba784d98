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

from dataclasses import dataclass

import torch

from server.engine.backbone import GenerationRules
from server.engine.request import Request

# Temperatures in (0, MIN_TEMPERATURE) are computed as MIN_TEMPERATURE: sampling among the tokens whose
# scores are within float32 rounding of the best one, i.e. greedy up to exact ties.
MIN_TEMPERATURE = 1e-30


def forced_token(request: Request, rules: GenerationRules, is_encoder_decoder: bool) -> int | None:
    """The token HF's forced-BOS/EOS logits processors would force at this step, if any."""
    num_out = len(request.output_token_ids)
    forced = None
    # HF: ForcedBOS at cur_len == 1 (cur_len counts the decoder input: [start] for seq2seq, the prompt otherwise)
    cur_len = num_out + (1 if is_encoder_decoder else len(request.prompt_token_ids))
    if rules.forced_bos_token_id is not None and cur_len == 1:
        forced = rules.forced_bos_token_id
    # HF: ForcedEOS at cur_len == max_length - 1, i.e. the last token the budget allows
    is_last = num_out == request.params.max_new_tokens - 1
    if rules.forced_eos_token_id is not None and not request.params.ignore_eos and is_last:
        forced = rules.forced_eos_token_id
    return forced


@dataclass
class SampledTokens:
    """One entry per row: the chosen id, or None where the row's own numbers broke (see `failed`)."""

    token_ids: list[int | None]

    @property
    def failed(self) -> list[int]:
        return [i for i, t in enumerate(self.token_ids) if t is None]


def filtered_scores(logits: torch.Tensor, temperature, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [s, V] float32 (finite), temperature/top_p [s] float32, top_k [s] long (0 = off) ->
    (scores sorted descending with the filtered-out ones at -inf [s, V], their token ids [s, V]).

    Never all -inf: the best token's score is exactly 0 whatever the temperature, and it always survives.
    """
    vocab = logits.shape[-1]
    best = logits.max(dim=-1, keepdim=True).values
    scores = (logits - best) / temperature.clamp(min=MIN_TEMPERATURE)[:, None]  # <= 0, best == 0
    scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    # top-k as HF does it: keep every token scoring at least the k-th best (ties at the k-th included)
    kth = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab) - 1
    keep = scores >= scores.gather(1, kth[:, None])
    scores = scores.masked_fill(~keep, float("-inf"))
    # top-p as HF does it: drop a token when the tokens more likely than it already hold >= top_p of the mass
    probs = scores.softmax(dim=-1)
    more_likely = probs.cumsum(dim=-1) - probs
    keep = (more_likely < top_p[:, None]) | (top_p[:, None] >= 1.0) | (ranks == 0)
    return scores.masked_fill(~keep, float("-inf")), order


class Sampler:
    def __init__(self, rules: GenerationRules, is_encoder_decoder: bool, device: torch.device):
        self.rules = rules
        self.is_encoder_decoder = is_encoder_decoder
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed)
            else:
                generator.seed()
            self._generators[request.request_id] = generator
        return generator

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """logits [n, vocab] float32, one row per request -> one id per row (None: the row failed).

        Host work is per row (reading its parameters); device work is batched; the only device->host
        wait is the final `.tolist()`.
        """
        forced = [forced_token(r, self.rules, self.is_encoder_decoder) for r in requests]
        is_finite = torch.isfinite(logits).all(dim=-1)  # [n]
        chosen = logits.argmax(dim=-1)  # [n] greedy rows
        rows = [i for i, r in enumerate(requests) if not r.params.is_greedy and forced[i] is None]
        if rows:
            chosen = chosen.index_copy(0, self._as_tensor(rows), self._draw(logits, requests, rows))
        token_ids, finite = torch.stack([chosen, is_finite.long()]).tolist()  # the step's one host sync
        out: list[int | None] = []
        for token_id, is_ok, force in zip(token_ids, finite, forced, strict=True):
            out.append(None if not is_ok else force if force is not None else token_id)
        return SampledTokens(out)

    def _as_tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A host list as a device tensor: a host->device copy, never a wait."""
        pinned = self.device.type == "cuda"
        return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=True)

    def _draw(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        """Sampled ids [s] for the given rows (Gumbel-max over the filtered scores, each row its own RNG)."""
        params = [requests[i].params for i in rows]
        selected = logits.index_select(0, self._as_tensor(rows))
        selected = torch.nan_to_num(selected, nan=0.0, posinf=0.0, neginf=0.0)  # failed rows: result unused
        scores, order = filtered_scores(
            selected,
            self._as_tensor([p.temperature for p in params], torch.float32),
            self._as_tensor([p.top_k for p in params]),
            self._as_tensor([p.top_p for p in params], torch.float32),
        )
        vocab = logits.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=self._generator(requests[i]), device=self.device) for i in rows]
        )
        gumbel = -torch.log(-torch.log(uniform))  # uniform in [0, 1): -inf at 0, never +inf
        pick = (scores + gumbel).argmax(dim=-1, keepdim=True)  # the best token is finite, so never NaN
        return order.gather(1, pick)[:, 0]
