"""Batch -> tensors -> forward -> sampled ids. Owns the KV slots; returns Python lists, not tensors.

Slots stay compact: the running sequences always occupy slots [0, B), so a decode step reads the cache
as a view with no gather. When a sequence leaves, the last slot's live entries move into its place (one
copy of one sequence); a joining sequence copies its prefix once into its slot. Nothing else is copied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.kv_cache import KVCache, plan_kv_cache
from server.engine.request import Request, ScheduledBatch
from server.engine.sampler import Sampler, TokenLogprob
from server.engine.transfer import copy_to_device


@dataclass
class SlotState:
    request: Request
    seq_len: int  # entries written in the self-attention cache (= position of the next fed token)
    cross_len: int  # BART: cross prefix + source entries
    last_token: int  # the token fed at the next decode step


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
        self.sampler = Sampler(backbone.rules, self.is_encoder_decoder, backbone.device)
        self.slots: list[SlotState] = []
        self.logprobs: dict[
            str, TokenLogprob
        ] = {}  # this step's, for requests that asked (the engine takes them)
        self.on_forward = on_forward or (lambda requests: None)
        self.forward_seconds = 0.0  # time inside the backbone's forward calls (bench: host time per step)

    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Free finished slots, then produce one token for each of batch.prefill + batch.decode.

        None for a row whose logits were not finite: that request failed alone (see Sampler)."""
        self._free(batch.finished)
        self.logprobs.clear()
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
        return [by_request[id(r)] for r in batch.sequences]

    def _free(self, finished: list[Request]) -> None:
        leaving = {id(r) for r in finished}
        for slot in reversed(range(len(self.slots))):
            if id(self.slots[slot].request) not in leaving:
                continue
            state = self.slots[slot]
            self.sampler.forget(state.request.request_id)
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
        tokens = self._sample(logits, requests)
        for request, num_prefix, token in zip(requests, prefix_lens, tokens, strict=True):
            fed = (
                self.backbone.rules.pad_token_id if token is None else token
            )  # a failed row leaves next step
            self.slots.append(SlotState(request, num_prefix + len(request.prompt_token_ids), 0, fed))
        return tokens

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
        else:
            logits = self.backbone.decode(self.cache, tokens, positions, length)
        self.forward_seconds += time.perf_counter() - started
        sampled = self._sample(logits, requests)
        for state, token in zip(self.slots, sampled, strict=True):
            state.seq_len += 1
            if token is not None:
                state.last_token = token
        return sampled
