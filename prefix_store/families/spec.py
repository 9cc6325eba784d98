"""What a backbone family is, in one place: shape, topology, fit check, generation rules.

Server, trainer and demo all read a family from the registry (families/__init__.py); nothing derives
these twice. A family module builds one FamilySpec and registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefix_store.format import BackboneShape


class BackboneError(ValueError):
    """A model directory or config that cannot be served or trained; the message says what to change."""


@dataclass(frozen=True)
class GenerationRules:
    """What HF generate(do_sample=False) applies for this backbone, reproduced exactly."""

    eos_token_ids: frozenset[int]  # every id in generation_config.eos_token_id (a list is allowed)
    bos_token_id: int | None
    pad_token_id: int
    decoder_start_token_id: int | None
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None


def generation_rules(generation_config: Any, tokenizer: Any) -> GenerationRules:
    """The rules from a model's generation_config, falling back to the tokenizer's special tokens."""
    gen = generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = (
        gen.pad_token_id
        if gen.pad_token_id is not None
        else (tokenizer.pad_token_id or min(eos_ids, default=0))
    )
    return GenerationRules(
        eos_token_ids=eos_ids,
        bos_token_id=gen.bos_token_id if gen.bos_token_id is not None else tokenizer.bos_token_id,
        pad_token_id=int(pad),
        decoder_start_token_id=gen.decoder_start_token_id,
        forced_bos_token_id=gen.forced_bos_token_id,
        forced_eos_token_id=gen.forced_eos_token_id,
    )


@dataclass(frozen=True)
class FamilySpec:
    """One backbone family. The callables take the HF config object (or its dict-like twin)."""

    model_type: str  # HF config.model_type
    description: str  # for error messages: "GPT-2 family causal LM (GPT2LMHeadModel)"
    is_encoder_decoder: bool
    targets: tuple[str, ...]  # prefix targets, in file order
    hf_model_class: str  # "transformers:GPT2LMHeadModel"
    server_backbone: str  # "server.engine.gpt2:GPT2Backbone" (imported only when loading)
    trainer_backbone: str  # "trainer.backbone:GPT2Backbone"
    shape: Callable[[Any], BackboneShape]
    max_positions: Callable[[Any], int]

    def fit_error(self, num_prefix: int, num_prompt: int, num_new: int, limit: int) -> str | None:
        """None when prefix + prompt + num_new tokens get positions within `limit`; else what is over.

        Decoder-only: [prefix | prompt | new] share the positions. Encoder-decoder: the encoder takes the
        prompt unshifted; the decoder takes [prefix | new] (the start token is the first of the new)."""
        if self.is_encoder_decoder:
            if num_prompt > limit:
                return f"the prompt has {num_prompt} tokens; this backbone encodes at most {limit}"
            needed, what = num_prefix + num_new, "prefix + max_new_tokens"
        else:
            needed, what = num_prefix + num_prompt + num_new, "prefix + prompt + max_new_tokens"
        if needed > limit:
            return f"{what} = {needed} tokens, over this backbone's {limit} positions"
        return None

    def forced_token(
        self,
        rules: GenerationRules,
        num_prompt: int,
        num_generated: int,
        max_new_tokens: int,
        ignore_eos: bool = False,
    ) -> int | None:
        """The token HF's ForcedBOS / ForcedEOS logits processors force for generated token
        num_generated + 1, if any."""
        forced = None
        # HF: ForcedBOS at cur_len == 1; cur_len counts the decoder input ([start] for encoder-decoder)
        cur_len = num_generated + (1 if self.is_encoder_decoder else num_prompt)
        if rules.forced_bos_token_id is not None and cur_len == 1:
            forced = rules.forced_bos_token_id
        # HF: ForcedEOS at cur_len == max_length - 1, i.e. the last token the budget allows
        if rules.forced_eos_token_id is not None and not ignore_eos and num_generated == max_new_tokens - 1:
            forced = rules.forced_eos_token_id
        return forced


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Called by each family module at import: makes the family known to families()/family()."""
    _REGISTRY[spec.model_type] = spec
    return spec
