"""Load a frozen GPT-2 or BART backbone, and the KV cache its forward passes share.

The forward passes themselves (gpt2.py, bart.py) reuse the HF modules' weights and sub-layers but own
the attention, because that is where a prefix enters: every row of a batch has its own prefix (or none)
of its own length, written at the start of its KV slot, and its own positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from prefix_store.format import BackboneShape

SUPPORTED = {
    "gpt2": "GPT-2 family causal LM (GPT2LMHeadModel)",
    "bart": "BART family seq2seq (BartForConditionalGeneration)",
}


log = logging.getLogger("prefixserve.engine")


class BackboneError(ValueError):
    pass


@dataclass(frozen=True)
class GenerationRules:
    """What HF generate(do_sample=False) applies for this backbone, reproduced exactly."""

    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    pad_token_id: int
    decoder_start_token_id: int | None
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None


class Backbone(Protocol):
    model_type: str
    shape: BackboneShape
    max_positions: int
    rules: GenerationRules
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise BackboneError(f"--dtype {dtype!r} must be one of auto, float32, float16, bfloat16")
    return table[dtype]


# generation_config settings HF generate() applies by default and prefixserve does not, with their neutral
# values: a backbone that sets one (BART summarisation checkpoints ship num_beams, no_repeat_ngram_size,
# length_penalty, min_length) is served with a warning at start, so nobody expects HF's default output.
UNAPPLIED_GENERATION_SETTINGS: dict[str, object] = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "do_sample": False,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "min_length": 0,
    "min_new_tokens": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def unapplied_generation_settings(generation_config: Any) -> dict[str, object]:
    """The settings in UNAPPLIED_GENERATION_SETTINGS that this generation_config sets to a non-neutral value."""
    found = {}
    for name, neutral in UNAPPLIED_GENERATION_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != neutral and value != []:
            found[name] = value
    return found


def warn_unapplied_generation_settings(generation_config: Any, name: str) -> None:
    found = unapplied_generation_settings(generation_config)
    if found:
        log.warning(
            "%s's generation_config sets %s; prefixserve does not apply these (requests decode greedily unless "
            "they ask for sampling, with no n-gram blocking, penalties or minimum length), so output differs "
            "from HF generate() with this config's defaults",
            name,
            ", ".join(f"{k}={v!r}" for k, v in found.items()),
        )


def _generation_rules(model: Any, tokenizer: Any) -> GenerationRules:
    gen = model.generation_config
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


def load_backbone(path: str | Path, device: str = "auto", dtype: str = "auto") -> Any:
    """Load a local HF directory as a frozen backbone; anything but GPT-2 / BART is refused."""
    from transformers import AutoConfig, AutoTokenizer, BartForConditionalGeneration, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    # a server logs lines (text or JSON), not progress bars; transformers' messages go through the root logger
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

    from server.engine.bart import BartBackbone
    from server.engine.gpt2 import GPT2Backbone

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BackboneError(
            f"--model {str(path)!r} is not a Hugging Face model directory (no config.json); pass a local "
            "directory saved with save_pretrained (nothing is downloaded)"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED:
        raise BackboneError(
            f"model_type {config.model_type!r} is not supported; prefixserve serves "
            + " or ".join(SUPPORTED.values())
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_cls = GPT2LMHeadModel if config.model_type == "gpt2" else BartForConditionalGeneration
    model: Any = model_cls.from_pretrained(path, dtype=torch_dtype)
    model = model.to(torch_device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rules = _generation_rules(model, tokenizer)
    warn_unapplied_generation_settings(model.generation_config, path.name)
    backbone_cls = GPT2Backbone if config.model_type == "gpt2" else BartBackbone
    return backbone_cls(model, tokenizer, rules, name=path.name)
