"""Beam search: HF's `_beam_search` for one request (batch size 1), run over k rows of the shared batch.

A request with `num_beams = k` is one *beam group*: its first logits come from one prefilled row, the runner
copies that row's KV into k-1 more slots, and from then on the group owns k rows of every decode step. After
each step a beam that continues another takes that beam's generated KV (see the runner).

NOTE: `BeamGroup.step` repeats transformers' `_beam_search` operation for operation, in the same order and in
float32, so its tokens equal `generate(num_beams=k, do_sample=False)` given the same logits: log_softmax
*then* the processors (repetition penalty on each beam's own history, forced BOS/EOS); beam 0 alone live at
step 0 (the others at -1e9); the top max(2, 1 + num_eos) * k candidates; finished hypotheses scored
`sum_logprobs / num_generated ** length_penalty` (the EOS counted); HF's stopping rule for each
`early_stopping`. Reordering any of it changes ties and therefore tokens. Only generated tokens are kept here
([k, max_new_tokens]). Design: docs/design/beams.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_store.families import FamilySpec, GenerationRules
from server.engine.request import Request
from server.engine.sampler import apply_penalties
from server.engine.step import BeamResult

NEG = -1.0e9  # HF's "very large negative value" for beams that must not be chosen


@dataclass
class BeamChoice:
    """One group's step as the runner needs it: beam j now feeds token_ids[j] and continues beam parents[j]
    (its generated KV comes from that beam's slot). result None: the group's logits were not finite."""

    token_ids: list[int]
    parents: list[int]
    result: BeamResult | None


def as_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a device index tensor: a host->device copy, never a wait (pinned, non-blocking)."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.long, pin_memory=pinned).to(device, non_blocking=True)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """HF's _gather_beams: [1, beams, ...] indexed by [1, n] -> [1, n, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


class BeamGroup:
    """The search state of one request, on the device. Beams are numbered 0..k-1 (HF's order)."""

    def __init__(self, request: Request, rules: GenerationRules, family: FamilySpec, device):
        params = request.params
        k = self.num_beams = params.num_beams
        self.max_new_tokens = params.max_new_tokens
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.rules = rules
        self.family = family
        is_encoder_decoder = family.is_encoder_decoder
        self.repetition_penalty = params.repetition_penalty
        # HF's decoder_prompt_len: what input_ids hold before generation (the prompt, or BART's start token)
        self.num_prompt = 1 if is_encoder_decoder else len(request.prompt_token_ids)
        eos = sorted(rules.eos_token_ids)
        self.eos = as_tensor(eos, device)
        self.beams_to_keep = max(2, 1 + len(eos)) * k
        self.top_mask = torch.zeros(self.beams_to_keep, dtype=torch.bool, device=device)
        self.top_mask[:k] = True
        fill = rules.pad_token_id
        self.running = torch.full((1, k, self.max_new_tokens), fill, dtype=torch.long, device=device)
        self.sequences = self.running.clone()  # finished hypotheses
        self.lengths = torch.zeros((1, k), dtype=torch.long, device=device)  # their numbers of tokens
        self.running_scores = torch.zeros((1, k), dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = NEG
        self.scores = torch.full((1, k), NEG, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros((1, k), dtype=torch.bool, device=device)
        self.is_improvable = torch.ones((1, 1), dtype=torch.bool, device=device)  # HF's heuristic bit
        self.num_generated = 0  # HF's cur_len - decoder_prompt_len
        self.gen_start = 0  # the runner's: first cache index of the generated part in this group's slots
        self._seen: torch.Tensor | None = None  # [V] bool: the prompt's tokens (repetition penalty)
        before = [rules.decoder_start_token_id or 0] if is_encoder_decoder else request.prompt_token_ids
        self._before = before

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [k, V] float32 -> HF's scores for this step: log_softmax, then the processors."""
        log_probs = torch.log_softmax(logits, dim=-1)
        if self.repetition_penalty != 1.0:
            log_probs = self._penalise(log_probs)
        forced = self.family.forced_token(
            self.rules, self.num_prompt, self.num_generated, self.max_new_tokens
        )
        if forced is not None:  # HF: -inf everywhere, 0 on the forced token
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[:, forced] = 0
        return log_probs

    def _penalise(self, log_probs: torch.Tensor) -> torch.Tensor:
        vocab = log_probs.shape[-1]
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=log_probs.device)
            self._seen[as_tensor([t for t in self._before if 0 <= t < vocab], log_probs.device)] = True
        k = self.num_beams
        seen = self._seen[None].repeat(k, 1)
        if self.num_generated:
            seen.scatter_(1, self.running[0, :, : self.num_generated], True)
        zeros = torch.zeros(k, device=log_probs.device)
        penalty = torch.full((k,), self.repetition_penalty, device=log_probs.device)
        return apply_penalties(log_probs, seen, torch.zeros_like(log_probs), penalty, zeros, zeros)

    def step(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HF's loop body, steps b-g. log_probs [k, V] (processed). Returns (tokens [k], parents [k],
        is_done [1]) on the device; nothing here waits for the device."""
        k, vocab = self.num_beams, log_probs.shape[-1]
        g = self.num_generated
        scores = (log_probs[None] + self.running_scores[:, :, None]).reshape(1, -1)  # [1, k * V]
        # c. the top candidates over all beams
        top_scores, top_indices = torch.topk(scores, k=self.beams_to_keep)
        top_parents = top_indices // vocab
        top_ids = top_indices % vocab
        top_sequences = _gather_beams(self.running, top_parents)
        top_sequences[:, :, g] = top_ids
        # d. which candidates hit a stopping criterion (EOS, or max_new_tokens reached)
        hits = torch.isin(top_ids, self.eos) | (g + 1 >= self.max_new_tokens)
        # e. the running beams of the next step: the best k that did not stop
        running_scores = top_scores + hits.to(torch.float32) * NEG
        next_indices = torch.topk(running_scores, k=k)[1]
        self.running = _gather_beams(top_sequences, next_indices)
        self.running_scores = _gather_beams(running_scores, next_indices)
        parents = _gather_beams(top_parents, next_indices)
        tokens = _gather_beams(top_ids, next_indices)
        # f. the finished hypotheses
        self._update_finished(top_sequences, top_scores, hits)
        # g. the stopping condition of the search as a whole
        self.num_generated = g = g + 1
        best_running = self.running_scores[:, :1] / (g**self.length_penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.scores, dim=1, keepdim=True)[0], NEG)
        self.is_improvable = self.is_improvable & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )
        is_open = ~(torch.all(self.is_finished) & self.early_stopping)
        can_continue = ~torch.all(hits)
        is_done = ~(torch.any(self.is_improvable) & is_open & can_continue)
        return tokens[0], parents[0], is_done.reshape(1)

    def _update_finished(self, top_sequences, top_scores, hits) -> None:
        g = self.num_generated
        just_finished = hits & self.top_mask[None, :]
        scores = top_scores / ((g + 1) ** self.length_penalty)
        is_full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        scores += is_full.to(torch.float32) * NEG
        scores += (~self.is_improvable).to(torch.float32) * NEG
        scores += (~just_finished) * NEG
        merged_scores = torch.cat((self.scores, scores), dim=1)
        merged_lengths = torch.cat(
            (self.lengths, torch.full_like(top_scores, g + 1, dtype=torch.long)), dim=1
        )
        best = torch.topk(merged_scores, k=self.num_beams)[1]
        self.sequences = _gather_beams(torch.cat((self.sequences, top_sequences), dim=1), best)
        self.scores = _gather_beams(merged_scores, best)
        self.lengths = _gather_beams(merged_lengths, best)
        self.is_finished = _gather_beams(torch.cat((self.is_finished, just_finished), dim=1), best)

    def best(self) -> list[int]:
        """The best finished hypothesis (a device->host wait; once, when the search is done)."""
        values = torch.cat([self.lengths[0, :1], self.sequences[0, 0]]).tolist()
        return values[1 : 1 + values[0]]


class BeamSearch:
    """All beam groups of the runner, stepped together with one device->host wait per step."""

    def __init__(self, rules: GenerationRules, family: FamilySpec, device: torch.device):
        self.rules = rules
        self.family = family
        self.device = device
        self.groups: dict[str, BeamGroup] = {}

    def forget(self, request_id: str) -> None:
        self.groups.pop(request_id, None)

    def group(self, request: Request) -> BeamGroup:
        group = self.groups.get(request.request_id)
        if group is None:
            group = self.groups[request.request_id] = BeamGroup(request, self.rules, self.family, self.device)
        return group

    def step(self, logits: torch.Tensor, groups: list[tuple[Request, list[int]]]) -> list[BeamChoice]:
        """logits [n, V] float32; each group's rows in beam order (one row: a new group, whose k beams all
        start from it). One BeamChoice per group."""
        columns = []
        for request, rows in groups:
            group = self.group(request)
            own = logits.index_select(0, as_tensor(rows, logits.device))
            is_finite = torch.isfinite(own).all().reshape(1)
            own = torch.nan_to_num(own, nan=0.0, posinf=0.0, neginf=0.0)  # a failed group's result is unused
            if len(rows) == 1:  # HF runs k identical rows at the first step
                own = own.expand(group.num_beams, -1)
            tokens, parents, is_done = group.step(group.process(own))
            columns.append(torch.cat([tokens, parents, is_done.long(), is_finite.long()]))
        values = torch.cat(columns).tolist()  # the beam groups' one device->host wait this step
        choices, at = [], 0
        for request, rows in groups:
            group = self.groups[request.request_id]
            k = group.num_beams
            own_values = values[at : at + 2 * k + 2]
            at += 2 * k + 2
            is_done, is_finite = own_values[2 * k :]
            result = BeamResult(len(rows), group.best() if is_done else None) if is_finite else None
            choices.append(BeamChoice(own_values[:k], own_values[k : 2 * k], result))
        return choices
