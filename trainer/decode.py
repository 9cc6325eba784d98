"""Greedy and beam decoding with a prefix, following HF generate's semantics (what the server reproduces).

GPT-2: the prompt is the filled template; generation stops at the tokenizer's EOS.
BART: the decoder starts from decoder_start_token_id; generation_config.forced_bos_token_id forces the first
token and forced_eos_token_id forces EOS as the last allowed token (the max_new_tokens-th).
Returned ids exclude the prompt, the decoder start token and the final EOS (as the server's `token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.backbone import Backbone, PrefixTensors


@dataclass(frozen=True)
class Forcing:
    eos_token_id: int
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None

    @classmethod
    def of(cls, backbone: Backbone) -> Forcing:
        if backbone.model_type != "bart":
            return cls(backbone.eos_token_id)
        config = backbone.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else backbone.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(eos, config.forced_bos_token_id, config.forced_eos_token_id)

    def apply(self, scores: torch.Tensor, num_generated: int, max_new_tokens: int) -> torch.Tensor:
        """scores [beams, V] for generated token number num_generated + 1."""
        forced = None
        if num_generated == 0 and self.forced_bos_token_id is not None:
            forced = self.forced_bos_token_id
        elif num_generated == max_new_tokens - 1 and self.forced_eos_token_id is not None:
            forced = self.forced_eos_token_id
        if forced is None:
            return scores
        out = torch.full_like(scores, -float("inf"))
        out[:, forced] = 0 if scores.dtype.is_floating_point else scores[:, forced]
        return out


@torch.no_grad()
def greedy(
    backbone: Backbone, prefix: PrefixTensors | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    forcing = Forcing.of(backbone)
    state, logits = backbone.begin(prefix, prompt_ids, num_beams=1)
    generated: list[int] = []
    for index in range(max_new_tokens):
        token = int(forcing.apply(logits, index, max_new_tokens).argmax(-1)[0])
        if token == forcing.eos_token_id:
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
    forcing = Forcing.of(backbone)
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
            if token == forcing.eos_token_id:
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
