"""A frozen GPT-2 or BART with a prefix: the teacher-forced loss for training and a step function for decoding.

Where the prefix enters (the same conventions as prefix_store/format.py and the server):

- GPT-2: every layer's self-attention sees the P prefix keys/values first; real tokens sit at positions
  P, P+1, ... (`position_ids = P + arange(T)`); prefix entries are never masked.
- BART encoder: every layer's self-attention sees the `encoder` prefix first; positions are NOT shifted.
- BART decoder: the self-attention cache starts with the `decoder` prefix, so HF puts real decoder tokens at
  positions P, P+1, ... (it counts positions from the cache length, as PEFT relies on).
- BART cross-attention: every decoder layer attends to [`cross` prefix ; encoder keys/values].

The forward is HF's own, fed with caches pre-filled with the prefix (DynamicCache.update concatenates, so
gradients reach the prefix); the encoder prefix enters through a pre-hook on each encoder self-attention.
A prefix may be None (the bare backbone, also used for full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from prefix_store.families import (
    BackboneError,
    FamilySpec,
    GenerationRules,
    family,
    generation_rules,
    load_class,
)
from prefix_store.format import BackboneShape, apply_template
from trainer.data import Example

PrefixTensors = dict[str, torch.Tensor]  # target -> [num_layers, 2, num_heads, P, head_dim]


@dataclass
class Features:
    """One tokenised example. GPT-2: `source_ids` = the filled template, `target_ids` continue it.
    BART: `source_ids` = encoder input, `target_ids` = decoder labels."""

    source_ids: list[int]
    target_ids: list[int]


@dataclass
class DecodeState:
    cache: DynamicCache | EncoderDecoderCache
    length: int  # GPT-2: P + tokens so far; BART: decoder tokens so far (without P)
    encoder_states: torch.Tensor | None = None  # BART: [beams, P_cross + S, D] placeholder for mask shapes
    encoder_mask: torch.Tensor | None = None  # BART: [beams, P_cross + S]


def _num_tokens(prefix: PrefixTensors | None, target: str) -> int:
    return 0 if prefix is None or target not in prefix else prefix[target].shape[3]


def _prefilled(prefix: torch.Tensor, batch_size: int) -> DynamicCache:
    """A cache holding the prefix: layer l = (keys, values) each [B, H, P, d]."""
    cache = DynamicCache()
    for layer, kv in enumerate(prefix):  # kv: [2, H, P, d]
        keys = kv[0].unsqueeze(0).expand(batch_size, -1, -1, -1)
        values = kv[1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of labels != -100, their count). logits [B, T, V], labels [B, T]."""
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")  # fmt: skip
    return loss, int((labels != -100).sum())


class Backbone:
    """Common parts: loading, freezing, the shape a prefix must have."""

    model_type: str
    targets: tuple[str, ...]

    def __init__(self, model: nn.Module, tokenizer, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.freeze()

    def freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def spec(self) -> FamilySpec:
        return family(self.model.config.model_type)

    @property
    def shape(self) -> BackboneShape:
        return self.spec.shape(self.model.config)

    @property
    def max_positions(self) -> int:
        return self.spec.max_positions(self.model.config)

    @property
    def rules(self) -> GenerationRules:
        return generation_rules(self.model.generation_config, self.tokenizer)

    def default_template(self) -> str:
        raise NotImplementedError

    def fits(self, features: Features, num_virtual_tokens: int) -> bool:
        """Whether every real token gets a position, by the family's rule (the server checks the same)."""
        num_source, num_target = len(features.source_ids), len(features.target_ids)
        return self.spec.fit_error(num_virtual_tokens, num_source, num_target, self.max_positions) is None

    def name(self) -> str:
        return Path(getattr(self.model.config, "_name_or_path", "") or "backbone").name


class GPT2Backbone(Backbone):
    model_type = "gpt2"
    targets = ("decoder",)

    def default_template(self) -> str:
        # the paper's table-to-text input: " {source} <|endoftext|>", the target follows as " {target}" + EOS
        return " {source} " + self.tokenizer.eos_token

    def featurize(self, example: Example, template: str) -> Features:
        source_ids = self.tokenizer(apply_template(template, example.source))["input_ids"]
        target_ids = self.tokenizer(" " + example.target)["input_ids"] + [self.eos_token_id]
        return Features(source_ids, target_ids)

    def collate(self, features: list[Features]) -> dict[str, torch.Tensor]:
        """Right-padded [B, T] input_ids / attention_mask / labels (-100 on the prompt and on padding)."""
        rows = [f.source_ids + f.target_ids for f in features]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.eos_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for i, (f, row) in enumerate(zip(features, rows, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(f.source_ids) : len(row)] = torch.tensor(f.target_ids)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None,
                 past: int) -> torch.Tensor:  # fmt: skip
        """Logits [B, T, V] for input_ids [B, T] after `past` cached entries (prefix and earlier tokens)."""
        batch, length = input_ids.shape
        positions = (past + torch.arange(length, device=self.device)).expand(batch, length)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=cache is not None)  # fmt: skip
        return out.logits

    def loss(self, batch: dict[str, torch.Tensor], prefix: PrefixTensors | None) -> tuple[torch.Tensor, int]:
        logits = self.logits(batch, prefix)
        return _token_nll(logits[:, :-1], batch["labels"][:, 1:].to(self.device))

    def logits(self, batch: dict[str, torch.Tensor], prefix: PrefixTensors | None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for a collated batch."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        num_tokens = _num_tokens(prefix, "decoder")
        size = batch["input_ids"].shape[0]
        cache = _prefilled(prefix["decoder"], size) if num_tokens else None
        ones = torch.ones((size, num_tokens), dtype=torch.long, device=self.device)
        mask = torch.cat([ones, batch["attention_mask"]], dim=1)  # [B, P + T]
        return self._forward(batch["input_ids"], mask, cache, num_tokens)

    def prompt_ids(self, source: str, template: str | None) -> list[int]:
        return self.tokenizer(apply_template(template, source))["input_ids"]

    def begin(self, prefix: PrefixTensors | None, prompt_ids: list[int], num_beams: int
              ) -> tuple[DecodeState, torch.Tensor]:  # fmt: skip
        """Prefill [prefix ; prompt] for num_beams copies; returns the state and next-token logits [beams, V]."""
        num_tokens = _num_tokens(prefix, "decoder")
        cache = _prefilled(prefix["decoder"], num_beams) if num_tokens else DynamicCache()
        input_ids = torch.tensor([prompt_ids] * num_beams, device=self.device)
        mask = torch.ones((num_beams, num_tokens + len(prompt_ids)), dtype=torch.long, device=self.device)
        logits = self._forward(input_ids, mask, cache, num_tokens)
        return DecodeState(cache, num_tokens + len(prompt_ids)), logits[:, -1]

    def step(self, state: DecodeState, tokens: torch.Tensor, beam_idx: torch.Tensor | None) -> torch.Tensor:
        """Append tokens [beams] (after reordering the beams by beam_idx); returns logits [beams, V]."""
        if beam_idx is not None:
            state.cache.reorder_cache(beam_idx)
        mask = torch.ones((tokens.shape[0], state.length + 1), dtype=torch.long, device=self.device)
        logits = self._forward(tokens[:, None], mask, state.cache, state.length)
        state.length += 1
        return logits[:, -1]

    @torch.no_grad()
    def activations(self, text: str) -> dict[str, torch.Tensor]:
        """Keys/values of a real text in every layer: {"decoder": [L, 2, H, T, d]} (init from real words)."""
        ids = torch.tensor([self.tokenizer(text)["input_ids"]], device=self.device)
        cache = self.model(input_ids=ids, use_cache=True).past_key_values
        return {
            "decoder": torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        }


class BartBackbone(Backbone):
    model_type = "bart"
    targets = ("encoder", "decoder", "cross")

    def default_template(self) -> str:
        return "{source}"

    def featurize(self, example: Example, template: str) -> Features:
        source_ids = self.tokenizer(apply_template(template, example.source))["input_ids"]
        return Features(source_ids, self.tokenizer(example.target)["input_ids"])

    def collate(self, features: list[Features]) -> dict[str, torch.Tensor]:
        """input_ids/attention_mask [B, S]; labels [B, T] (-100 on padding); decoder_input_ids = labels shifted
        right behind decoder_start_token_id."""
        pad = self.tokenizer.pad_token_id
        start = self.model.config.decoder_start_token_id
        src_width = max(len(f.source_ids) for f in features)
        tgt_width = max(len(f.target_ids) for f in features)
        input_ids = torch.full((len(features), src_width), pad)
        mask = torch.zeros((len(features), src_width), dtype=torch.long)
        labels = torch.full((len(features), tgt_width), -100)
        for i, f in enumerate(features):
            input_ids[i, : len(f.source_ids)] = torch.tensor(f.source_ids)
            mask[i, : len(f.source_ids)] = 1
            labels[i, : len(f.target_ids)] = torch.tensor(f.target_ids)
        decoder_input_ids = torch.cat([torch.full((len(features), 1), start), labels[:, :-1]], dim=1)
        decoder_input_ids[decoder_input_ids == -100] = pad
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids}  # fmt: skip

    @contextmanager
    def _encoder_prefix(self, prefix: torch.Tensor | None, batch_size: int) -> Iterator[None]:
        """While active, every encoder self-attention sees the prefix keys/values before the real ones."""
        if prefix is None:
            yield
            return
        cache = _prefilled(prefix, batch_size)
        num_tokens = prefix.shape[3]
        handles = [
            layer.self_attn.register_forward_pre_hook(
                partial(_prepend_to_self_attention, cache, num_tokens), with_kwargs=True
            )  # fmt: skip
            for layer in self.model.model.encoder.layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _encode(self, prefix: PrefixTensors | None, input_ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, EncoderDecoderCache]:  # fmt: skip
        """Run the encoder; return (encoder states [B, Pc + S, D], their mask [B, Pc + S], the decoder cache).

        The cross-attention cache holds [cross prefix ; k/v projections of the encoder output] for every decoder
        layer and is marked as filled, so HF reuses it instead of projecting `encoder_states` (which then only
        gives the mask its shape: zeros stand in for the Pc prefix rows)."""
        batch = input_ids.shape[0]
        encoder_prefix = prefix.get("encoder") if prefix else None
        with self._encoder_prefix(encoder_prefix, batch):
            states = self.model.model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        self_cache = (
            _prefilled(prefix["decoder"], batch) if _num_tokens(prefix, "decoder") else DynamicCache()
        )
        cross_tokens = _num_tokens(prefix, "cross")
        cross_cache = DynamicCache()
        for index, layer in enumerate(self.model.model.decoder.layers):
            attn = layer.encoder_attn
            keys = attn.k_proj(states).view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            values = attn.v_proj(states).view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            if cross_tokens:
                cross = prefix["cross"][index]  # [2, H, Pc, d]
                keys = torch.cat([cross[0].unsqueeze(0).expand(batch, -1, -1, -1), keys], dim=2)
                values = torch.cat([cross[1].unsqueeze(0).expand(batch, -1, -1, -1), values], dim=2)
            cross_cache.update(keys, values, index)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        filler = states.new_zeros((batch, cross_tokens, states.shape[2]))
        ones = mask.new_ones((batch, cross_tokens))
        return torch.cat([filler, states], dim=1), torch.cat([ones, mask], dim=1), cache

    def _decode(self, decoder_input_ids: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                cache: EncoderDecoderCache) -> torch.Tensor:  # fmt: skip
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                         decoder_input_ids=decoder_input_ids, past_key_values=cache, use_cache=True)  # fmt: skip
        return out.logits

    def loss(self, batch: dict[str, torch.Tensor], prefix: PrefixTensors | None) -> tuple[torch.Tensor, int]:
        return _token_nll(self.logits(batch, prefix), batch["labels"].to(self.device))

    def logits(self, batch: dict[str, torch.Tensor], prefix: PrefixTensors | None) -> torch.Tensor:
        """Teacher-forced decoder logits [B, T, V] for a collated batch."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states, mask, cache = self._encode(prefix, batch["input_ids"], batch["attention_mask"])
        return self._decode(batch["decoder_input_ids"], states, mask, cache)

    def prompt_ids(self, source: str, template: str | None) -> list[int]:
        return self.tokenizer(apply_template(template, source))["input_ids"]

    def begin(self, prefix: PrefixTensors | None, prompt_ids: list[int], num_beams: int
              ) -> tuple[DecodeState, torch.Tensor]:  # fmt: skip
        input_ids = torch.tensor([prompt_ids] * num_beams, device=self.device)
        states, mask, cache = self._encode(prefix, input_ids, torch.ones_like(input_ids))
        start = torch.full((num_beams, 1), self.model.config.decoder_start_token_id, device=self.device)
        logits = self._decode(start, states, mask, cache)
        return DecodeState(cache, 1, states, mask), logits[:, -1]

    def step(self, state: DecodeState, tokens: torch.Tensor, beam_idx: torch.Tensor | None) -> torch.Tensor:
        if beam_idx is not None:
            state.cache.reorder_cache(beam_idx)
        assert state.encoder_states is not None and state.encoder_mask is not None
        logits = self._decode(tokens[:, None], state.encoder_states, state.encoder_mask, state.cache)
        state.length += 1
        return logits[:, -1]

    @torch.no_grad()
    def activations(self, text: str) -> dict[str, torch.Tensor]:
        """Keys/values of a real text (encoder input and decoder input alike), each [L, 2, H, T, d]."""
        ids = torch.tensor([self.tokenizer(text)["input_ids"]], device=self.device)
        out = self.model(input_ids=ids, decoder_input_ids=ids, use_cache=True, output_hidden_states=True)
        encoder = []
        for layer, hidden in zip(self.model.model.encoder.layers, out.encoder_hidden_states, strict=False):
            attn = layer.self_attn  # encoder_hidden_states[l] is layer l's input
            keys = attn.k_proj(hidden[0]).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
            values = attn.v_proj(hidden[0]).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
            encoder.append(torch.stack([keys, values]))
        cache = out.past_key_values

        def stacked(part: DynamicCache) -> torch.Tensor:
            return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in part.layers])

        return {"encoder": torch.stack(encoder), "decoder": stacked(cache.self_attention_cache),
                "cross": stacked(cache.cross_attention_cache)}  # fmt: skip


def _prepend_to_self_attention(cache: DynamicCache, num_tokens: int, module: nn.Module, args: tuple,
                               kwargs: dict) -> tuple[tuple, dict]:  # fmt: skip
    """Forward pre-hook on a BART encoder self-attention: hand it the prefix as a cache (HF concatenates the
    layer's keys/values after it) and widen the [B, 1, S, S] mask with P always-visible columns."""
    kwargs = dict(kwargs)
    kwargs["past_key_values"] = cache
    mask = kwargs.get("attention_mask")
    if mask is not None:
        visible = (
            torch.ones if mask.dtype == torch.bool else torch.zeros
        )  # bool: True = attend; float: additive
        columns = visible((*mask.shape[:-1], num_tokens), dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([columns, mask], dim=-1)
    return args, kwargs


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> Backbone:
    """Load a local HF directory of a registered family in float32, frozen, in eval mode."""
    config = AutoConfig.from_pretrained(path)
    try:
        spec = family(config.model_type)
    except BackboneError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_class(spec.hf_model_class).from_pretrained(path, dtype=torch.float32)
    return load_class(spec.trainer_backbone)(model, tokenizer, torch.device(device))
