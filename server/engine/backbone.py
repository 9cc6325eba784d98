"""Load a frozen backbone of a registered family (prefix_store/families) for serving.

The forward passes themselves (gpt2.py, bart.py) reuse the HF modules' weights and sub-layers but own
the attention, because that is where a prefix enters: every row of a batch has its own prefix (or none)
of its own length, written at the start of its KV slot, and its own positions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from prefix_store.families import BackboneError, GenerationRules, family, generation_rules, load_class
from prefix_store.format import BackboneShape

__all__ = ["Backbone", "BackboneError", "GenerationRules", "load_backbone", "resolve_device", "resolve_dtype"]

log = logging.getLogger("prefixserve.engine")


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


def load_backbone(path: str | Path, device: str = "auto", dtype: str = "auto", weights: bool = True) -> Any:
    """Load a local HF directory as a frozen backbone; a model_type no family registers is refused. `weights`:
    the modules without their weights (on PyTorch's meta device; `device` still names where the runner
    serves), for a front whose forward passes run in another process (worker.py): shape, tokenizer and
    generation rules only, no memory for the weights."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    # a server logs lines (text or JSON), not progress bars; transformers' messages go through the root logger
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BackboneError(
            f"--model {str(path)!r} is not a Hugging Face model directory (no config.json); pass a local "
            "directory saved with save_pretrained (nothing is downloaded)"
        )
    config = AutoConfig.from_pretrained(path)
    spec = family(config.model_type)  # BackboneError naming the supported families otherwise
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_class = load_class(spec.hf_model_class)
    if weights:
        model: Any = model_class.from_pretrained(path, dtype=torch_dtype)
        model = model.to(torch_device).eval().requires_grad_(False)
        generation_config = model.generation_config
    else:
        with torch.device("meta"):
            model = model_class._from_config(config, dtype=torch_dtype).eval().requires_grad_(False)
        try:  # what from_pretrained reads: the directory's generation_config.json, else the model config's
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rules = generation_rules(generation_config, tokenizer)
    if weights:  # the process that loads the weights says it (once)
        warn_unapplied_generation_settings(generation_config, path.name)
    backbone = load_class(spec.server_backbone)(model, tokenizer, rules, name=path.name)
    if not weights:
        backbone.device = torch_device  # where the runner's process serves, not the meta device
    return backbone
