"""Batch -> tensors -> forward -> sampled ids. Owns the KV slots; returns Python lists, not tensors.

Slots stay compact: the running sequences always occupy slots [0, B), so a decode step reads the cache
as a view with no gather. When a sequence leaves, the last slot's live entries move into its place (one
copy of one sequence); a joining sequence copies its prefix once into its slot. Nothing else is copied,
except for beam search (beam.py): a beam group's prompt is run once, then its KV (prefix, prompt; BART's
cross entries too) is copied into the group's other k-1 slots, and after each step a beam that continues
another beam copies only the generated part [prefix + prompt, seq_len) from that beam's slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.beam import BeamChoice, BeamSearch, as_tensor
from server.engine.cuda_graphs import LENGTH_STEP, DecodeGraphs
from server.engine.kv_cache import KVCache, plan_kv_cache
from server.engine.request import BeamResult, Request, ScheduledBatch
from server.engine.sampler import Sampler, TokenLogprob
from server.engine.transfer import copy_to_device


@dataclass
class SlotState:
    request: Request
    seq_len: int  # entries written in the self-attention cache (= position of the next fed token)
    cross_len: int  # BART: cross prefix + source entries
    last_token: int  # the token fed at the next decode step
    beam: int = 0  # which beam of its request's beam group this slot holds (0 without beam search)


def _targets(request: Request) -> dict[str, torch.Tensor]:
    return {} if request.prefix is None else request.prefix.targets


class ModelRunner:
    def __init__(
        self,
        backbone,
        max_num_seqs: int,
        max_model_len: int,
        max_prefix_tokens: int,
        on_forward: Callable[[list[Request]], None] | None = None,
        kv_cache_bytes: int | None = None,
        cuda_graphs: bool = True,
    ):
        self.backbone = backbone
        self.is_encoder_decoder = backbone.spec.is_encoder_decoder
        self.max_model_len = min(max_model_len, backbone.max_positions)
        cross_len = max_prefix_tokens + backbone.max_positions if self.is_encoder_decoder else 0
        per_seq = KVCache.bytes_per_slot(backbone.shape, self.max_model_len, cross_len, backbone.dtype)
        # raises KVBudgetError when not even one full-length sequence fits
        self.kv_plan = plan_kv_cache(per_seq, self.max_model_len, max_num_seqs, kv_cache_bytes)
        self.cache = KVCache(
            backbone.shape,
            self.kv_plan.num_seqs,
            self.max_model_len,
            cross_len,
            backbone.device,
            backbone.dtype,
        )
        graphed = cuda_graphs and backbone.device.type == "cuda" and not self.is_encoder_decoder
        self.graphs = DecodeGraphs(backbone, self.cache, self.kv_plan.num_seqs) if graphed else None
        self.sampler = Sampler(backbone.rules, backbone.spec, backbone.device)
        self.beams = BeamSearch(backbone.rules, backbone.spec, backbone.device)
        self._beam_choices: dict[int, BeamChoice] = {}  # this step's, by id(request)
        self._to_fork: list[tuple[int, BeamChoice]] = []  # chosen, KV not yet forked (see _fork_beams)
        self.slots: list[SlotState] = []
        self.logprobs: dict[
            str, TokenLogprob
        ] = {}  # this step's, for requests that asked (the engine takes them)
        self.on_forward = on_forward or (lambda requests: None)
        self.forward_seconds = 0.0  # time inside the backbone's forward calls (bench: host time per step)

    @property
    def decode_mode(self) -> str:
        """What the start-up log says about decode steps."""
        if self.graphs is not None:
            return (
                f"CUDA graphs, captured on first use per bucket of rows ({', '.join(map(str, self.graphs.buckets))})"
                f" x keys (multiples of {LENGTH_STEP}); --cuda-graphs false for eager"
            )
        return "eager" + (
            " (CUDA graphs are for GPT-2 on CUDA)"
            if self.backbone.device.type != "cuda" or self.is_encoder_decoder
            else " (--cuda-graphs false)"
        )

    def execute(self, batch: ScheduledBatch) -> list[int | BeamResult | None]:
        """Free finished slots, then produce one token for each of batch.prefill + batch.decode (a BeamResult
        for a beam-search request). None for a request whose logits were not finite: it failed alone."""
        self._free(batch.finished)
        self.logprobs.clear()
        self._beam_choices.clear()
        if not batch.sequences:
            return []
        assert {id(s.request) for s in self.slots} == {id(r) for r in batch.decode}, "slots out of sync"
        if self.is_encoder_decoder:
            self._encode(batch.prefill)
            sampled = self._decode()
        else:
            sampled = (self._decode() if self.slots else []) + self._prefill(batch.prefill)
        # _decode covers the slots that existed before the prefill, in slot order; _prefill the new ones
        by_request = {id(state.request): token for state, token in zip(self.slots, sampled, strict=True)}
        return [
            self._beam_choices[id(r)].result if id(r) in self._beam_choices else by_request[id(r)]
            for r in batch.sequences
        ]

    def _free(self, finished: list[Request]) -> None:
        leaving = {id(r) for r in finished}
        for slot in reversed(range(len(self.slots))):
            if id(self.slots[slot].request) not in leaving:
                continue
            state = self.slots[slot]
            self.sampler.forget(state.request.request_id)
            self.beams.forget(state.request.request_id)
            # what a request wrote is never read by the next one (masked entries still enter the matmul
            # with weight 0, and 0 * NaN is NaN): zero it, and the copy a compaction leaves behind
            self.cache.clear(slot, state.seq_len, state.cross_len)
            last = len(self.slots) - 1
            if slot != last:
                moved = self.slots[last]
                self.cache.move(last, slot, moved.seq_len, moved.cross_len)
                self.cache.clear(last, moved.seq_len, moved.cross_len)
                self.slots[slot] = moved
            self.slots.pop()

    def _prefill(self, requests: list[Request]) -> list[int | None]:
        """GPT-2: write prefixes, run the prompts, sample each sequence's first token."""
        if not requests:
            return []
        start = len(self.slots)
        prefix_lens = [
            self.backbone.write_prefix(self.cache, start + i, _targets(r)) for i, r in enumerate(requests)
        ]
        prompts = [r.prompt_token_ids for r in requests]
        self.on_forward(requests)
        started = time.perf_counter()
        logits = self.backbone.prefill(self.cache, start, prompts, prefix_lens)
        self.forward_seconds += time.perf_counter() - started
        tokens = self._choose(logits, requests, [0] * len(requests))
        for request, num_prefix, token in zip(requests, prefix_lens, tokens, strict=True):
            fed = (
                self.backbone.rules.pad_token_id if token is None else token
            )  # a failed row leaves next step
            self.slots.append(SlotState(request, num_prefix + len(request.prompt_token_ids), 0, fed))
        return tokens + self._fork_beams()

    def _encode(self, requests: list[Request]) -> None:
        """BART: write prefixes, encode the sources; the new rows join the next decode with the start token."""
        if not requests:
            return
        start = len(self.slots)
        written = [
            self.backbone.write_prefix(self.cache, start + i, _targets(r)) for i, r in enumerate(requests)
        ]
        started = time.perf_counter()
        cross_lens = self.backbone.encode(
            self.cache,
            start,
            [r.prompt_token_ids for r in requests],
            [_targets(r).get("encoder") for r in requests],
            [num_cross for _, num_cross in written],
        )
        self.forward_seconds += time.perf_counter() - started
        start_token = self.backbone.rules.decoder_start_token_id
        for request, (num_decoder, _), cross_len in zip(requests, written, cross_lens, strict=True):
            self.slots.append(SlotState(request, num_decoder, cross_len, start_token))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int | None]:
        out = self.sampler.sample(logits, requests)
        for request, logprob in zip(requests, out.logprobs, strict=True):
            if logprob is not None:
                self.logprobs[request.request_id] = logprob
        return out.token_ids

    def _decode(self) -> list[int | None]:
        """One token for every slot, in slot order."""
        requests = [s.request for s in self.slots]
        # built on the host, copied once (pinned, non_blocking on CUDA): no wait before the forward
        host = [
            torch.tensor([s.last_token for s in self.slots]),
            torch.tensor([s.seq_len for s in self.slots]),
        ]
        if self.is_encoder_decoder:
            host.append(torch.tensor([s.cross_len for s in self.slots]))
        tokens, positions, *cross = copy_to_device(host, self.backbone.device)
        length = max(s.seq_len for s in self.slots) + 1
        self.on_forward(requests)
        started = time.perf_counter()
        if self.is_encoder_decoder:
            cross_length = max(s.cross_len for s in self.slots)
            logits = self.backbone.decode(self.cache, tokens, positions, length, cross[0], cross_length)
        elif self.graphs is not None:
            logits = self.graphs(tokens, positions, length)
        else:
            logits = self.backbone.decode(self.cache, tokens, positions, length)
        self.forward_seconds += time.perf_counter() - started
        sampled = self._choose(logits, requests, [s.beam for s in self.slots])
        for state, token in zip(self.slots, sampled, strict=True):
            state.seq_len += 1
            if token is not None:
                state.last_token = token
        return sampled + self._fork_beams()

    # -- beam search (beam.py): the group's rows among everyone's, and the KV its beams share -------------
    def _choose(self, logits: torch.Tensor, requests: list[Request], beams: list[int]) -> list[int | None]:
        """The next token of every row: the sampler's for ordinary rows, the beam search's for beam rows
        (the token the row feeds next). Without beam rows this is the sampler alone (one host wait)."""
        beam_rows = [i for i, r in enumerate(requests) if r.params.num_beams > 1]
        if not beam_rows:
            return self._sample(logits, requests)
        tokens: list[int | None] = [None] * len(requests)
        other = [i for i, r in enumerate(requests) if r.params.num_beams == 1]
        if other:
            own = logits.index_select(0, as_tensor(other, logits.device))
            for i, token in zip(other, self._sample(own, [requests[i] for i in other]), strict=True):
                tokens[i] = token
        groups: dict[int, list[int]] = {}  # id(request) -> its rows, in beam order
        for i in sorted(beam_rows, key=lambda i: beams[i]):
            groups.setdefault(id(requests[i]), []).append(i)
        choices = self.beams.step(logits, [(requests[rows[0]], rows) for rows in groups.values()])
        for (key, rows), choice in zip(groups.items(), choices, strict=True):
            self._beam_choices[key] = choice
            self._to_fork.append((key, choice))
            for i in rows:
                tokens[i] = None if choice.result is None else choice.token_ids[beams[i]]
        return tokens

    def _fork_beams(self) -> list[int | None]:
        """After a step: a new group fills its other k-1 slots from its one row (appended; returns the tokens
        they feed); in a running group, beam j takes the generated KV of beam parents[j] — one gather, so
        any permutation is safe. A group that is done or failed leaves at the next step: nothing to copy."""
        appended: list[int | None] = []
        to_fork, self._to_fork = self._to_fork, []
        for key, choice in to_fork:
            if choice.result is None or choice.result.token_ids is not None:
                continue
            slots = sorted(
                (i for i, s in enumerate(self.slots) if id(s.request) == key),
                key=lambda i: self.slots[i].beam,
            )
            first = self.slots[slots[0]]
            group = self.beams.groups[first.request.request_id]
            if len(slots) == 1:
                new = list(range(len(self.slots), len(self.slots) + group.num_beams - 1))
                _copy_kv(self.cache, [slots[0]] * len(new), new, 0, first.seq_len, first.cross_len)
                group.gen_start = first.seq_len
                for beam, token in enumerate(choice.token_ids[1:], start=1):
                    self.slots.append(SlotState(first.request, first.seq_len, first.cross_len, token, beam))
                    appended.append(token)
                continue
            moves = [(slots[p], slots[j]) for j, p in enumerate(choice.parents) if p != j]
            if moves:
                src, dst = zip(*moves, strict=True)
                _copy_kv(self.cache, list(src), list(dst), group.gen_start, first.seq_len, 0)
        return appended


def _copy_kv(cache: KVCache, src: list[int], dst: list[int], start: int, end: int, cross_len: int) -> None:
    """Slots dst take slots src's self-attention entries [start, end) (and cross entries [0, cross_len)).
    The right-hand side is gathered into a new tensor before the write, so src and dst may overlap."""
    src_index = as_tensor(src, cache.self_kv.device)
    dst_index = as_tensor(dst, cache.self_kv.device)
    cache.self_kv[:, :, dst_index, :, start:end] = cache.self_kv[:, :, src_index, :, start:end]
    if cross_len and cache.cross_kv is not None:
        cache.cross_kv[:, :, dst_index, :, :cross_len] = cache.cross_kv[:, :, src_index, :, :cross_len]
