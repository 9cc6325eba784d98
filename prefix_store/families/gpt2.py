"""GPT-2 family: decoder-only, one `decoder` prefix in every layer's self-attention."""

from __future__ import annotations

from typing import Any

from prefix_store.families.spec import FamilySpec, register
from prefix_store.format import BackboneShape


def _shape(config: Any) -> BackboneShape:
    # GPT-2 attention is multi-head: as many K/V heads as query heads
    return BackboneShape("gpt2", config.n_layer, config.n_head, config.n_embd // config.n_head)


GPT2 = register(
    FamilySpec(
        model_type="gpt2",
        description="GPT-2 family causal LM (GPT2LMHeadModel)",
        is_encoder_decoder=False,
        targets=("decoder",),
        hf_model_class="transformers:GPT2LMHeadModel",
        server_backbone="server.engine.gpt2:GPT2Backbone",
        trainer_backbone="trainer.backbone:GPT2Backbone",
        shape=_shape,
        max_positions=lambda config: config.n_positions,
    )
)
