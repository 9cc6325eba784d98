"""BART family: encoder-decoder; `encoder`, `decoder` and `cross` prefixes."""

from __future__ import annotations

from typing import Any

from prefix_store.families.spec import BackboneError, FamilySpec, register
from prefix_store.format import BackboneShape


def _shape(config: Any) -> BackboneShape:
    if config.encoder_layers != config.decoder_layers or (
        config.encoder_attention_heads != config.decoder_attention_heads
    ):
        raise BackboneError("BART backbones need as many encoder as decoder layers and heads")
    heads = config.decoder_attention_heads
    return BackboneShape("bart", config.decoder_layers, heads, config.d_model // heads)


BART = register(
    FamilySpec(
        model_type="bart",
        description="BART family seq2seq (BartForConditionalGeneration)",
        is_encoder_decoder=True,
        targets=("encoder", "decoder", "cross"),
        hf_model_class="transformers:BartForConditionalGeneration",
        server_backbone="server.engine.bart:BartBackbone",
        trainer_backbone="trainer.backbone:BartBackbone",
        shape=_shape,
        max_positions=lambda config: config.max_position_embeddings,
    )
)
