"""BART forward passes: encoder, decoder and cross-attention prefixes, each where the file has it.

- encoder:  the encoder prefix's K/V are prepended to each encoder layer's self-attention keys/values;
            encoder positions are not shifted.
- decoder:  like GPT-2 — slot layout `[prefix | decoder tokens]`, cache index == position, so decoder
            positions start at P (what PEFT does for seq2seq prefix-tuning).
- cross:    cross slot layout `[cross prefix | encoder K/V]`, visible to every decoder query.
New sequences are encoded once (encode()), then join the decode batch with decoder_start_token_id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prefix_store.families import GenerationRules, family
from prefix_store.families.spec import BackboneError
from server.engine.kv_cache import KVCache
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
        cache: KVCache,
        start: int,
        token_lists: list[list[int]],
        encoder_prefixes: list[torch.Tensor | None],
        cross_lens: list[int],
    ) -> list[int]:
        """Encode new sources into slots [start, start+n): fills each slot's cross K/V after its cross prefix
        (already written, `cross_lens[i]` entries). Returns the cross lengths (prefix + source)."""
        assert cache.cross_kv is not None
        device = self.device
        n = len(token_lists)
        src_len = max(len(t) for t in token_lists)
        prefix, prefix_lens = _pad_prefixes(encoder_prefixes, cache.self_kv)
        num_prefix = 0 if prefix is None else prefix.shape[4]
        # built on the host, copied once: ids, key mask, and where each real source token's cross K/V goes
        ids = torch.full((n, src_len), self.rules.pad_token_id, dtype=torch.long)
        key_valid = torch.zeros(n, num_prefix + src_len, dtype=torch.long)  # [prefix (padded) | source]
        rows: list[int] = []
        cols: list[int] = []
        queries: list[int] = []
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            key_valid[i, : prefix_lens[i]] = 1
            key_valid[i, num_prefix : num_prefix + len(tokens)] = 1
            rows += [start + i] * len(tokens)
            cols += range(cross_lens[i], cross_lens[i] + len(tokens))
            queries += range(i * src_len, i * src_len + len(tokens))
        ids, key_valid, rows_t, cols_t, queries_t = copy_to_device(
            [ids, key_valid, torch.tensor(rows), torch.tensor(cols), torch.tensor(queries)], device
        )
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
            kv = cache.cross_kv[index]  # [2, S, H, C, d]
            kv[0][rows_t, :, cols_t] = self._flat_heads(attn.k_proj(h)).index_select(
                0, queries_t
            )  # [N, H, d]
            kv[1][rows_t, :, cols_t] = self._flat_heads(attn.v_proj(h)).index_select(0, queries_t)
        return [c + len(t) for c, t in zip(cross_lens, token_lists, strict=True)]

    @torch.inference_mode()
    def decode(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        cross_lens: torch.Tensor,
        cross_length: int,
    ) -> torch.Tensor:
        """One decoder token for each slot [0, B). tokens/positions/cross_lens [B]. Returns logits [B, vocab]."""
        assert cache.cross_kv is not None
        device = self.device
        num_rows = tokens.shape[0]
        rows = torch.arange(num_rows, device=device)
        self_mask = (torch.arange(length, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        cross_mask = (torch.arange(cross_length, device=device)[None, :] < cross_lens[:, None])[
            :, None, None, :
        ]
        h = self.decoder.embed_tokens(tokens[:, None]) + self._positions(
            self.decoder.embed_positions, positions[:, None]
        )
        h = self.decoder.layernorm_embedding(h)  # [B, 1, D]
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            q, k, v = self._heads(attn.q_proj(h)), self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h))
            kv = cache.self_kv[index]
            kv[0][rows, :, positions] = k[:, :, 0]
            kv[1][rows, :, positions] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q,
                kv[0, :num_rows, :, :length],
                kv[1, :num_rows, :, :length],
                attn_mask=self_mask,
                scale=attn.scaling,
            )
            h = layer.self_attn_layer_norm(h + attn.out_proj(self._merge(out)))

            attn = layer.encoder_attn
            ckv = cache.cross_kv[index]
            out = F.scaled_dot_product_attention(
                self._heads(attn.q_proj(h)),
                ckv[0, :num_rows, :, :cross_length],
                ckv[1, :num_rows, :, :cross_length],
                attn_mask=cross_mask,
                scale=attn.scaling,
            )
            h = layer.encoder_attn_layer_norm(h + attn.out_proj(self._merge(out)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        logits = self.model.lm_head(h[:, 0]) + self.model.final_logits_bias
        return logits.float()

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
