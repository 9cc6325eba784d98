"""GPT-2 forward passes over the slot KV cache: a prefix in every layer's self-attention.

Slot layout: `[prefix (P_row) | prompt | generated]`, cache index == position id, so real tokens'
positions start at P_row exactly as PEFT's prefix-tuning gives them. A query at position p attends to
every cache entry j <= p: its own prefix (never masked) and its own earlier tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefix_store.families import GenerationRules, family
from server.engine.kv_cache import KVCache
from server.engine.transfer import copy_to_device


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

    def _layer(
        self, h: torch.Tensor, index: int, cache: KVCache, write: tuple, read: slice, length: int, mask
    ):
        """One block. h [n, T, D]; writes the K/V of the queries at flat indices `queries` [N] (into [n*T])
        at cache (rows, cols) [N], then attends over slots `read`, cache entries [0, length)."""
        rows, cols, queries = write
        block = self.blocks[index]
        n, num_q, hidden = h.shape
        heads, head_dim = self.shape.num_heads, self.shape.head_dim
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(hidden, dim=2)
        kv = cache.self_kv[index]  # [2, S, H, T, d]
        # integer indices of known length (not a boolean mask): no device -> host wait for the count
        kv[0][rows, :, cols] = k.reshape(n * num_q, heads, head_dim).index_select(0, queries)  # [N, H, d]
        kv[1][rows, :, cols] = v.reshape(n * num_q, heads, head_dim).index_select(0, queries)
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
        the cache nor read. Every index is built on the host and copied once. Returns next-token logits
        [n, vocab] (float32) at each prompt's last token.
        """
        n = len(token_lists)
        num_q = max(len(t) for t in token_lists)
        ids = torch.zeros(n, num_q, dtype=torch.long)
        positions = torch.zeros(n, num_q, dtype=torch.long)  # padded queries: position 0, never read
        rows: list[int] = []
        cols: list[int] = []
        queries: list[int] = []
        last: list[int] = []
        for i, (tokens, num_prefix) in enumerate(zip(token_lists, prefix_lens, strict=True)):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            positions[i, : len(tokens)] = torch.arange(num_prefix, num_prefix + len(tokens))
            rows += [start + i] * len(tokens)
            cols += range(num_prefix, num_prefix + len(tokens))
            queries += range(i * num_q, i * num_q + len(tokens))
            last.append(i * num_q + len(tokens) - 1)
        ids, positions, rows_t, cols_t, queries_t, last_t = copy_to_device(
            [
                ids,
                positions,
                torch.tensor(rows),
                torch.tensor(cols),
                torch.tensor(queries),
                torch.tensor(last),
            ],
            self.device,
        )
        length = max(p + len(t) for p, t in zip(prefix_lens, token_lists, strict=True))
        # [n, 1, Tq, K]: key j visible to the query at position p iff j <= p
        mask = (torch.arange(length, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]
        h = self.transformer.wte(ids) + self.transformer.wpe(positions)
        write = (rows_t, cols_t, queries_t)
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, write, slice(start, start + n), length, mask)
        last_h = h.reshape(n * num_q, -1).index_select(0, last_t)  # [n, D]
        return self.lm_head(self.transformer.ln_f(last_h)).float()

    @torch.inference_mode()
    def decode(
        self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, length: int
    ) -> torch.Tensor:
        """One token for each of the slots [0, B): tokens/positions [B] on the device; `length` =
        max(positions) + 1."""
        num_rows = tokens.shape[0]
        rows = torch.arange(num_rows, device=self.device)
        write = (rows, positions, rows)  # query i of the [B, 1] batch is flat index i
        mask = (torch.arange(length, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
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
