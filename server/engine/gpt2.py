"""GPT-2 forward passes over the slot KV cache: a prefix in every layer's self-attention.

Slot layout: `[prefix (P_row) | prompt | generated]`, cache index == position id, so real tokens'
positions start at P_row exactly as PEFT's prefix-tuning gives them. A query at position p attends to
every cache entry j <= p: its own prefix (never masked) and its own earlier tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefix_store.format import BackboneShape
from server.engine.backbone import GenerationRules
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
        self.shape = BackboneShape("gpt2", config.n_layer, config.n_head, config.n_embd // config.n_head)
        self.max_positions = config.n_positions
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype

    def _layer(
        self, h: torch.Tensor, index: int, cache: KVCache, write: tuple, read: slice, length: int, mask
    ):
        """One block. h [n, T, D]; writes the K/V of queries `valid` [n, T] at cache (rows, cols) [N], then
        attends over slots `read`, cache entries [0, length)."""
        rows, cols, valid = write
        block = self.blocks[index]
        n, num_q, hidden = h.shape
        heads, head_dim = self.shape.num_heads, self.shape.head_dim
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(hidden, dim=2)
        kv = cache.self_kv[index]  # [2, S, H, T, d]
        k, v = k.view(n, num_q, heads, head_dim), v.view(n, num_q, heads, head_dim)
        # valid None: one query per row, all written (decode)
        kv[0][rows, :, cols] = k[:, 0] if valid is None else k[valid]  # [N, H, d]
        kv[1][rows, :, cols] = v[:, 0] if valid is None else v[valid]
        q = q.view(n, num_q, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, kv[0, read, :, :length], kv[1, read, :, :length], attn_mask=mask, scale=block.attn.scaling
        )
        h = block.attn.c_proj(out.transpose(1, 2).reshape(n, num_q, hidden)) + h
        return h + block.mlp(block.ln_2(h))

    @torch.inference_mode()
    def prefill(
        self, cache: KVCache, start: int, token_lists: list[list[int]], prefix_lens: list[int]
    ) -> torch.Tensor:
        """Run new sequences in slots [start, start+n) whose prefixes are already in the cache.

        Prompts are right-padded to the longest; padded queries compute garbage that is never written to
        the cache nor read. Returns next-token logits [n, vocab] (float32) at each prompt's last token.
        """
        device = self.device
        n = len(token_lists)
        lens = torch.tensor([len(t) for t in token_lists], device=device)
        num_q = max(len(t) for t in token_lists)
        ids = torch.zeros(n, num_q, dtype=torch.long, device=device)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens, device=device)
        steps = torch.arange(num_q, device=device)
        positions = torch.tensor(prefix_lens, device=device)[:, None] + steps  # [n, Tq]
        valid = steps[None, :] < lens[:, None]  # [n, Tq]
        rows = (start + torch.arange(n, device=device))[:, None].expand(n, num_q)[valid]
        write = (rows, positions[valid], valid)
        length = max(p + len(t) for p, t in zip(prefix_lens, token_lists, strict=True))
        # [n, 1, Tq, K]: key j visible to the query at position p iff j <= p
        mask = (torch.arange(length, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        h = self.transformer.wte(ids) + self.transformer.wpe(positions.clamp(max=self.max_positions - 1))
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, write, slice(start, start + n), length, mask)
        last = h[torch.arange(n, device=device), lens - 1]  # [n, D]
        return self.lm_head(self.transformer.ln_f(last)).float()

    @torch.inference_mode()
    def decode(
        self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, length: int
    ) -> torch.Tensor:
        """One token for each of the slots [0, B): tokens/positions [B]; `length` = max(positions) + 1."""
        num_rows = tokens.shape[0]
        device = self.device
        write = (torch.arange(num_rows, device=device), positions, None)
        mask = (torch.arange(length, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        h = (self.transformer.wte(tokens) + self.transformer.wpe(positions))[:, None]  # [B, 1, D]
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, write, slice(0, num_rows), length, mask)
        return self.lm_head(self.transformer.ln_f(h[:, 0])).float()

    def write_prefix(self, cache: KVCache, slot: int, targets: dict[str, torch.Tensor]) -> int:
        """Copy a prefix into the start of its slot; returns P (0 without a prefix)."""
        decoder = targets.get("decoder")
        if decoder is None:
            return 0
        cache.self_kv[:, :, slot, :, : decoder.shape[3]] = decoder  # [L, 2, H, P, d]
        return decoder.shape[3]
