"""Greedy and beam decoding with a prefix, following HF generate's semantics (what the server reproduces).

GPT-2: the prompt is the filled template. BART: the decoder starts from decoder_start_token_id.
Generation stops at any of generation_config's EOS ids, and forced BOS/EOS tokens apply where HF applies
them: both by the family's rules (prefix_store/families), the same the server applies.
Returned ids exclude the prompt, the decoder start token and the final EOS (as the server's `token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_store.families import FamilySpec, GenerationRules
from trainer.backbone import Backbone, PrefixTensors


@dataclass(frozen=True)
class Forcing:
    """The family's generation rules (prefix_store/families), as the server applies them."""

    spec: FamilySpec
    rules: GenerationRules
    num_prompt: int

    @classmethod
    def of(cls, backbone: Backbone, num_prompt: int) -> Forcing:
        return cls(backbone.spec, backbone.rules, num_prompt)

    def is_eos(self, token: int) -> bool:
        return token in self.rules.eos_token_ids

    def apply(self, scores: torch.Tensor, num_generated: int, max_new_tokens: int) -> torch.Tensor:
        """scores [beams, V] for generated token number num_generated + 1."""
        forced = self.spec.forced_token(self.rules, self.num_prompt, num_generated, max_new_tokens)
        if forced is None:
            return scores
        out = torch.full_like(scores, -float("inf"))
        out[:, forced] = 0 if scores.dtype.is_floating_point else scores[:, forced]
        return out


@torch.no_grad()
def greedy(
    backbone: Backbone, prefix: PrefixTensors | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    forcing = Forcing.of(backbone, len(prompt_ids))
    state, logits = backbone.begin(prefix, prompt_ids, num_beams=1)
    generated: list[int] = []
    for index in range(max_new_tokens):
        token = int(forcing.apply(logits, index, max_new_tokens).argmax(-1)[0])
        if forcing.is_eos(token):
            break
        generated.append(token)
        if index + 1 < max_new_tokens:
            logits = backbone.step(state, torch.tensor([token], device=backbone.device), None)
    return generated


@torch.no_grad()
def beam_search(backbone: Backbone, prefix: PrefixTensors | None, prompt_ids: list[int], max_new_tokens: int,
                num_beams: int = 5, length_penalty: float = 1.0) -> list[int]:  # fmt: skip
    """Beam search as HF's (scores = summed log-probabilities / length ** length_penalty, 2*beams candidates per
    step, a hypothesis ends at EOS), stopping when no running beam can beat the worst of num_beams finished."""
    if num_beams == 1:
        return greedy(backbone, prefix, prompt_ids, max_new_tokens)
    forcing = Forcing.of(backbone, len(prompt_ids))
    state, logits = backbone.begin(prefix, prompt_ids, num_beams)
    device = backbone.device
    beam_scores = torch.full((num_beams,), -float("inf"), device=device)
    beam_scores[0] = 0.0  # all beams are the same at the start: keep one
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []
    for index in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logprobs = forcing.apply(logprobs, index, max_new_tokens)
        vocab = logprobs.shape[-1]
        scores, flat = (beam_scores[:, None] + logprobs).view(-1).topk(2 * num_beams)
        next_beams, next_tokens, next_scores = [], [], []
        for score, position in zip(scores.tolist(), flat.tolist(), strict=True):
            beam, token = divmod(position, vocab)
            if forcing.is_eos(token):
                finished.append((score / max(len(beams[beam]) + 1, 1) ** length_penalty, beams[beam]))
            else:
                next_beams.append(beam)
                next_tokens.append(token)
                next_scores.append(score)
            if len(next_beams) == num_beams:
                break
        beams = [beams[b] + [t] for b, t in zip(next_beams, next_tokens, strict=True)]
        if index + 1 == max_new_tokens:  # out of room: running hypotheses end here
            finished += [(s / len(b) ** length_penalty, b) for s, b in zip(next_scores, beams, strict=True)]
        finished.sort(key=lambda item: -item[0])
        finished = finished[:num_beams]
        best_running = next_scores[0] / (index + 2) ** length_penalty if next_scores else -float("inf")
        is_done = len(finished) == num_beams and finished[-1][0] >= best_running
        if is_done or not next_beams or index + 1 == max_new_tokens:
            break
        beam_scores = torch.tensor(next_scores, device=device)
        logits = backbone.step(
            state, torch.tensor(next_tokens, device=device), torch.tensor(next_beams, device=device)
        )
    return finished[0][1] if finished else beams[0]
