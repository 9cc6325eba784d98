"""Llama-family forward passes (Llama, Qwen2, Mistral) over the slot KV cache, the way gpt2.py does GPT-2's.

Slot layout: `[prefix (P_row) | prompt | generated]` per key/value head, cache index == position id. Where
PEFT puts a prefix on these models (checked against peft 0.21 and transformers 5.23): the prefix's keys sit
in the cache as stored, never rotated; real tokens get position ids P, P+1, ... (PEFT shifts the position ids
generate() derives from the attention mask by P), and their keys are rotated at those positions before they
enter the cache. So a query at position p attends to every cache entry j <= p, exactly as with GPT-2.

Rotary cos/sin come from the model's own rotary module (every rope type HF computes from the config), called
undecorated: its dynamic-frequency hook only acts past the positions this family serves (families/llama.py
caps them) and would wait on the device. Grouped-query attention: the query heads sharing a key/value head
are stacked as extra query rows of that head, so the cache is read once per key/value head, never repeated.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch

from prefix_store.families import GenerationRules, family
from server.engine.decoder_inputs import Attention, write_decoder_prefix
from server.engine.kv_cache import KVCache

log = logging.getLogger("prefixserve.engine")


class LlamaBackbone:
    def __init__(self, model, tokenizer, rules: GenerationRules, name: str):
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.rules = rules
        self.name = name
        self.model_type = config.model_type
        self.decoder = model.model
        self.lm_head = model.lm_head
        self.blocks = list(self.decoder.layers)
        self.spec = family(config.model_type)
        self.shape = self.spec.shape(config)
        self.max_positions = self.spec.max_positions(config)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        self.groups = self.shape.num_heads // self.shape.kv_heads  # query heads per key/value head
        self.rotary = self.decoder.rotary_emb
        # undecorated: HF's dynamic-frequency hook acts only past the positions served, and waits on the
        # device
        self._rotary_forward = inspect.unwrap(type(self.rotary).forward)
        # the modeling module's own rotation (Qwen2 and Mistral carry copies of Llama's)
        self._rotate = sys.modules[type(model).__module__].apply_rotary_pos_emb
        if self.max_positions < config.max_position_embeddings:  # families/llama.py says why
            log.info(
                "%s: serving prefix + prompt + new tokens up to %d of its %d positions (sliding window or "
                "longrope: past that, HF's attention or rotary frequencies change, and so would the output)",
                name,
                self.max_positions,
                config.max_position_embeddings,
            )

    def _layer(self, h: torch.Tensor, index: int, cache, attention: Attention, rope, mask):
        """One decoder layer. h [n, T, D]; writes the rotated K and the V of the queries `attention.queries`
        [N] (flat, into [n*T]) where `attention.write` says, then attends over the keys `attention.read`
        names. rope: (cos, sin) [n, T, d]; mask [n, 1, groups*T, K]."""
        block = self.blocks[index]
        attn = block.self_attn
        n, num_q, _ = h.shape
        heads, kv_heads, head_dim = self.shape.num_heads, self.shape.kv_heads, self.shape.head_dim
        x = block.input_layernorm(h)
        q = attn.q_proj(x).view(n, num_q, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(n, num_q, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(n, num_q, kv_heads, head_dim)
        q, k = self._rotate(q, k, *rope)
        queries = attention.queries
        cache.write(
            index,
            attention.write,
            k.transpose(1, 2).reshape(n * num_q, kv_heads, head_dim).index_select(0, queries),
            v.reshape(n * num_q, kv_heads, head_dim).index_select(0, queries),
        )
        # query head g*groups + r reads key/value head g (HF's repeat_kv): rows [r, t] of head g
        q = q.reshape(n, kv_heads, self.groups * num_q, head_dim)
        out = cache.attend(index, q, attention, mask, attn.scaling)
        out = out.reshape(n, heads, num_q, head_dim).transpose(1, 2).reshape(n, num_q, heads * head_dim)
        h = attn.o_proj(out) + h
        return h + block.mlp(block.post_attention_layernorm(h))

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's (cos, sin) [n, T, head_dim] for position ids [n, T], in h's dtype."""
        return self._rotary_forward(self.rotary, h, positions)

    def _grouped(self, mask: torch.Tensor) -> torch.Tensor:
        """[n, 1, T, K] -> [n, 1, groups*T, K]: the same visibility for every query head of a group."""
        n, _, num_q, keys = mask.shape
        return mask.expand(n, self.groups, num_q, keys).reshape(n, 1, self.groups * num_q, keys)

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
        h = self.decoder.embed_tokens(x.ids)
        rope = self._rope(h, x.positions)
        grouped = self._grouped(x.attention.mask)
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, x.attention, rope, grouped)
        last_h = h.reshape(n * x.ids.shape[1], -1).index_select(0, x.last)  # [n, D]
        return self.lm_head(self.decoder.norm(last_h)).float()

    @torch.inference_mode()
    def decode(self, cache, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One token for each of the slots [0, B): tokens/positions [B] on the device; `length`: the keys
        the rows read (the cache's decode_length)."""
        attention = cache.decode_attention(positions, length)
        h = self.decoder.embed_tokens(tokens)[:, None]  # [B, 1, D]
        rope = self._rope(h, positions[:, None])
        grouped = self._grouped(attention.mask)
        for index in range(len(self.blocks)):
            h = self._layer(h, index, cache, attention, rope, grouped)
        return self.lm_head(self.decoder.norm(h[:, 0])).float()

    def write_prefix(self, cache: KVCache, slot: int, targets: dict[str, torch.Tensor]) -> int:
        return write_decoder_prefix(cache, slot, targets)
