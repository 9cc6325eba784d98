"""Llama-architecture family: decoder-only with rotary positions, grouped-query attention, RMSNorm, SwiGLU.

One shape under three names: LlamaForCausalLM, Qwen2ForCausalLM (biases on q/k/v) and MistralForCausalLM
(a sliding window). A prefix holds keys and values per key/value head, as PEFT lays it out for grouped-query
attention; its model_type is the backbone's, so a Qwen2 prefix is never served by a Llama.

Positions served are capped where HF's attention would stop being plain causal attention: a sliding window
below max_position_embeddings caps them at the window (every key is inside it, so the output is exact), and
longrope at its original length (beyond it HF switches every position's frequencies at once).
"""

from __future__ import annotations

from typing import Any

from prefix_store.families.spec import BackboneError, FamilySpec, register
from prefix_store.format import BackboneShape

# rope types HF computes once from the config (or, for "dynamic", recomputes only past max positions)
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


def head_dim(config: Any) -> int:
    """What HF's attention uses (and PEFT's GQA layout): config.head_dim when set, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config: Any) -> int | None:
    """The window some layer of this config attends within, or None when every layer is full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def rope_type(config: Any) -> str:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_type", "default")


def _shape(config: Any) -> BackboneShape:
    kind = rope_type(config)
    if kind not in _ROPE_TYPES:
        raise BackboneError(
            f"rope_type {kind!r} is not served; prefixserve serves the rope types {', '.join(_ROPE_TYPES)}"
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv_heads:
        raise BackboneError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    return BackboneShape(config.model_type, config.num_hidden_layers, heads, head_dim(config), kv_heads)


def _max_positions(config: Any) -> int:
    limit = config.max_position_embeddings
    window = sliding_window(config)
    if window is not None:
        limit = min(limit, window)
    if rope_type(config) == "longrope":
        limit = min(limit, config.rope_parameters["original_max_position_embeddings"])
    return limit


def _register(model_type: str, hf_class: str, description: str) -> FamilySpec:
    return register(
        FamilySpec(
            model_type=model_type,
            description=description,
            is_encoder_decoder=False,
            targets=("decoder",),
            hf_model_class=f"transformers:{hf_class}",
            server_backbone="server.engine.llama:LlamaBackbone",
            trainer_backbone="trainer.llama:LlamaBackbone",
            shape=_shape,
            max_positions=_max_positions,
        )
    )


LLAMA = _register("llama", "LlamaForCausalLM", "Llama family causal LM (LlamaForCausalLM)")
QWEN2 = _register("qwen2", "Qwen2ForCausalLM", "Qwen2 family causal LM (Qwen2ForCausalLM)")
MISTRAL = _register("mistral", "MistralForCausalLM", "Mistral family causal LM (MistralForCausalLM)")
