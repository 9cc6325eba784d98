"""BART forward passes: encoder, decoder and cross-attention prefixes, each where the file has it.

- encoder:  the encoder prefix's K/V are prepended to each encoder layer's self-attention keys/values;
            encoder positions are not shifted.
- decoder:  like GPT-2 — slot layout `[prefix | decoder tokens]`, cache index == position, so decoder
            positions start at P (what PEFT does for seq2seq prefix-tuning).
- cross:    cross layout `[cross prefix | encoder K/V]`, visible to every decoder query.
New sequences are encoded once (encode()), then join the decode batch with decoder_start_token_id. The layers
reach the KV cache only through its calls (`decode_attention` / `prefill_inputs`, `cross_attention`, `write`,
`attend`, `cross_where`, `write_cross`, `attend_cross`), so the slot cache (kv_cache.py) and the paged one
(paged_cache.py) serve them alike. A request resumed after a preemption (paged) runs its generated tokens through
the decoder again (prefill_decoder) after its source is encoded again.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefix_store.families import GenerationRules, family
from prefix_store.families.spec import BackboneError
from server.engine.decoder_inputs import Attention, padded_queries
from server.engine.kv_cache import KVCache
from server.engine.paged_cache import PagedKVCache
from server.engine.transfer import copy_to_device


def _pad_prefixes(
    prefixes: list[torch.Tensor | None], like: torch.Tensor
) -> tuple[torch.Tensor | None, list[int]]:
    """Stack per-row prefixes [L, 2, H, P_i, d] (or None) into [L, 2, n, H, P_max, d], zero-padded on the right."""
    lens = [0 if p is None else p.shape[3] for p in prefixes]
    if max(lens) == 0:
        return None, lens
    first = next(p for p in prefixes if p is not None)
    num_layers, _, heads, _, head_dim = first.shape
    out = like.new_zeros(num_layers, 2, len(prefixes), heads, max(lens), head_dim)
    for i, p in enumerate(prefixes):
        if p is not None:
            out[:, :, i, :, : lens[i]] = p
    return out, lens


class BartBackbone:
    model_type = "bart"

    def __init__(self, model, tokenizer, rules: GenerationRules, name: str):
        config = model.config
        self.spec = family(config.model_type)
        self.shape = self.spec.shape(config)  # BackboneError unless encoder and decoder match
        if rules.decoder_start_token_id is None:
            raise BackboneError("the BART config has no decoder_start_token_id")
        self.model = model
        self.tokenizer = tokenizer
        self.rules = rules
        self.name = name
        self.encoder = model.model.encoder
        self.decoder = model.model.decoder
        self.max_positions = self.spec.max_positions(config)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype

    @staticmethod
    def _positions(module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        return nn.Embedding.forward(module, positions + module.offset)  # type: ignore[arg-type, operator]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[n, T, D] -> [n, H, T, d]"""
        n, length, _ = x.shape
        return x.view(n, length, self.shape.num_heads, self.shape.head_dim).transpose(1, 2)

    def _flat_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[n, T, D] -> [n*T, H, d]"""
        n, length, _ = x.shape
        return x.reshape(n * length, self.shape.num_heads, self.shape.head_dim)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H, T, d] -> [n, T, D]"""
        n, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(n, length, -1)

    @torch.inference_mode()
    def encode(
        self,
        cache: KVCache | PagedKVCache,
        start: int,
        token_lists: list[list[int]],
        encoder_prefixes: list[torch.Tensor | None],
        cross_lens: list[int],
    ) -> list[int]:
        """Encode new sources into slots [start, start+n): fills each slot's cross K/V after its cross prefix
        (already written, `cross_lens[i]` entries). Returns the cross lengths (prefix + source)."""
        device = self.device
        n = len(token_lists)
        prefix, prefix_lens = _pad_prefixes(encoder_prefixes, self.model.lm_head.weight)
        num_prefix = 0 if prefix is None else prefix.shape[4]
        # built on the host in one pass, copied once: ids, key mask, where each source token's cross K/V goes
        lens, valid, ids_np, _ = padded_queries(token_lists, [0] * n)  # valid [n, S]: a real source token
        src_len = valid.shape[1]
        ids_np[~valid] = self.rules.pad_token_id
        key_valid_np = np.zeros((n, num_prefix + src_len), dtype=np.int64)  # [prefix (padded) | source]
        key_valid_np[:, :num_prefix] = np.arange(num_prefix)[None, :] < np.asarray(prefix_lens)[:, None]
        key_valid_np[:, num_prefix:] = valid
        rows = np.repeat(start + np.arange(n), lens)
        cols = (np.asarray(cross_lens, dtype=np.int64)[:, None] + np.arange(src_len))[valid]
        ids, key_valid, queries_t = copy_to_device(
            [torch.from_numpy(a) for a in (ids_np, key_valid_np, np.flatnonzero(valid))], device
        )
        where = cache.cross_where(rows, cols, device)
        steps = torch.arange(src_len, device=device)
        mask = key_valid.bool()[
            :, None, None, :
        ]  # [n, 1, 1, P_max + S]: bidirectional, pads and prefix padding out

        h = self.encoder.embed_tokens(ids) + self._positions(self.encoder.embed_positions, steps)[None]
        h = self.encoder.layernorm_embedding(h)
        for index, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            q, k, v = self._heads(attn.q_proj(h)), self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h))
            if prefix is not None:
                k = torch.cat([prefix[index, 0], k], dim=2)
                v = torch.cat([prefix[index, 1], v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            h = layer.self_attn_layer_norm(h + attn.out_proj(self._merge(out)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
            if h.dtype == torch.float16:  # as BartEncoderLayer does, without a host wait on the check
                clamp = torch.finfo(h.dtype).max - 1000
                h = torch.where(torch.isfinite(h).all(), h, torch.clamp(h, min=-clamp, max=clamp))

        for index, layer in enumerate(self.decoder.layers):
            attn = layer.encoder_attn
            cache.write_cross(
                index,
                where,
                self._flat_heads(attn.k_proj(h)).index_select(0, queries_t),  # [N, H, d]
                self._flat_heads(attn.v_proj(h)).index_select(0, queries_t),
            )
        return [c + len(t) for c, t in zip(cross_lens, token_lists, strict=True)]

    def _decoder_layers(
        self, h: torch.Tensor, cache: KVCache | PagedKVCache, attention: Attention, cross: Attention
    ) -> torch.Tensor:
        """h [n, T, D] through the decoder layers: each writes the self-attention K/V of the queries
        `attention.queries` (flat, into [n*T]) where `attention.write` says, attends over the keys
        `attention.read` names, then over the rows' cross entries."""
        queries = attention.queries
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            k, v = self._flat_heads(attn.k_proj(h)), self._flat_heads(attn.v_proj(h))  # [n*T, H, d]
            cache.write(index, attention.write, k.index_select(0, queries), v.index_select(0, queries))
            q = self._heads(attn.q_proj(h))
            out = cache.attend(index, q, attention, attention.mask, attn.scaling)  # [n, H, T, d]
            h = layer.self_attn_layer_norm(h + attn.out_proj(self._merge(out)))

            attn = layer.encoder_attn
            out = cache.attend_cross(index, self._heads(attn.q_proj(h)), cross, attn.scaling)
            h = layer.encoder_attn_layer_norm(h + attn.out_proj(self._merge(out)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        return h

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decoder inputs [n, T] at positions [n, T] -> [n, T, D]."""
        h = self.decoder.embed_tokens(ids) + self._positions(self.decoder.embed_positions, positions)
        return self.decoder.layernorm_embedding(h)

    @torch.inference_mode()
    def decode(
        self,
        cache: KVCache | PagedKVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        cross_lens: torch.Tensor,
        cross_length: int,
    ) -> torch.Tensor:
        """One decoder token for each slot [0, B). tokens/positions/cross_lens [B]; `length`: the keys the rows
        read (the cache's decode_length). Returns logits [B, vocab]."""
        attention = cache.decode_attention(positions, length)
        cross = cache.cross_attention(0, cross_lens, cross_length)
        h = self._decoder_layers(self._embed(tokens[:, None], positions[:, None]), cache, attention, cross)
        logits = self.model.lm_head(h[:, 0]) + self.model.final_logits_bias
        return logits.float()

    @torch.inference_mode()
    def prefill_decoder(
        self,
        cache: KVCache | PagedKVCache,
        start: int,
        token_lists: list[list[int]],
        prefix_lens: list[int],
        cross_lens: list[int],
    ) -> None:
        """Write the decoder K/V of `token_lists` (the start token and all but the last generated token) of slots
        [start, start+n), encoded and joined, from each row's P: a resumed request's decoder as it was. The
        step's decode then feeds each row's last token and samples its next one."""
        x = cache.prefill_inputs(start, token_lists, prefix_lens, self.device)
        lens = copy_to_device([torch.tensor(cross_lens)], self.device)[0]
        cross = cache.cross_attention(start, lens, max(cross_lens))
        self._decoder_layers(self._embed(x.ids, x.positions), cache, x.attention, cross)

    def write_prefix(self, cache: KVCache, slot: int, targets: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Copy decoder and cross prefixes into the slot; returns (P_decoder, P_cross)."""
        num_decoder = num_cross = 0
        if (decoder := targets.get("decoder")) is not None:
            num_decoder = decoder.shape[3]
            cache.self_kv[:, :, slot, :, :num_decoder] = decoder
        if (cross := targets.get("cross")) is not None:
            assert cache.cross_kv is not None
            num_cross = cross.shape[3]
            cache.cross_kv[:, :, slot, :, :num_cross] = cross
        return num_decoder, num_cross
