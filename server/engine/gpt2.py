"""GPT-2 forward passes over the slot KV cache: a prefix in every layer's self-attention.

Slot layout: `[prefix (P_row) | prompt | generated]`, cache index == position id, so real tokens'
positions start at P_row exactly as PEFT's prefix-tuning gives them. A query at position p attends to
every cache entry j <= p: its own prefix (never masked) and its own earlier tokens.
"""

from __future__ import annotations

import torch

from prefix_store.families import GenerationRules, family
from server.engine.decoder_inputs import Attention, write_decoder_prefix
from server.engine.kv_cache import KVCache


class GPT2Backbone:
    model_type = "gpt2"

    def __init__(self, model, tokenizer, rules: GenerationRules, name: str):
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.rules = rules
        self.name = name
        self.transformer = model.transformer
        self.lm_head = model.lm_head
        self.blocks = list(self.transformer.h)
        self.spec = family(config.model_type)
        self.shape = self.spec.shape(config)
        self.max_positions = self.spec.max_positions(config)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype

    def _layer(self, h: torch.Tensor, index: int, cache, attention: Attention):
        """One block. h [n, T, D]; writes the K/V of the queries `attention.queries` [N] (flat, into [n*T])
        where `attention.write` says, then attends over the keys `attention.read` names."""
        block = self.blocks[index]
        n, num_q, hidden = h.shape
        heads, head_dim = self.shape.num_heads, self.shape.head_dim
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(hidden, dim=2)
        queries = attention.queries
        cache.write(
            index,
            attention.write,
            k.reshape(n * num_q, heads, head_dim).index_select(0, queries),  # [N, H, d]
            v.reshape(n * num_q, heads, head_dim).index_select(0, queries),
        )
        q = q.view(n, num_q, heads, head_dim).transpose(1, 2)
        out = cache.attend(index, q, attention, attention.mask, block.attn.scaling)  # [n, H, T, d]
        h = block.attn.c_proj(out.transpose(1, 2).reshape(n, num_q, hidden)) + h
        return h + block.mlp(block.ln_2(h))

    @torch.inference_mode()
    def prefill(
        self, cache, start: int, token_lists: list[list[int]], prefix_lens: list[int]
    ) -> torch.Tensor:
        """Run new sequences in slots [start, start+n) whose prefixes are already in the cache.

        Prompts are right-padded to the longest; padded queries compute garbage that is never written to
        the cache nor read. Every index is built on the host and copied once. Returns next-token logits
        [n, vocab] (float32) at each prompt's last token.
        """
        n = len(token_lists)
        x = cache.prefill_inputs(start, token_lists, prefix_lens, self.device)
        h = self.transformer.wte(x.ids) + self.transformer.wpe(x.positions)
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, x.attention)
        last_h = h.reshape(n * x.ids.shape[1], -1).index_select(0, x.last)  # [n, D]
        return self.lm_head(self.transformer.ln_f(last_h)).float()

    @torch.inference_mode()
    def decode(self, cache, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One token for each of the slots [0, B): tokens/positions [B] on the device; `length`: the keys
        the rows read (the cache's decode_length)."""
        attention = cache.decode_attention(positions, length)
        h = (self.transformer.wte(tokens) + self.transformer.wpe(positions))[:, None]  # [B, 1, D]
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, attention)
        return self.lm_head(self.transformer.ln_f(h[:, 0])).float()

    def write_prefix(self, cache: KVCache, slot: int, targets: dict[str, torch.Tensor]) -> int:
        return write_decoder_prefix(cache, slot, targets)
