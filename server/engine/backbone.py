"""Load a frozen GPT-2 or BART backbone, and the KV cache its forward passes share.

The forward passes themselves (gpt2.py, bart.py) reuse the HF modules' weights and sub-layers but own
the attention, because that is where a prefix enters: every row of a batch has its own prefix (or none)
of its own length, written at the start of its KV slot, and its own positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from prefix_store.format import BackboneShape

SUPPORTED = {
    "gpt2": "GPT-2 family causal LM (GPT2LMHeadModel)",
    "bart": "BART family seq2seq (BartForConditionalGeneration)",
}


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


class KVCache:
    """Per-slot KV storage. Slot s holds `[prefix (P) | tokens]`; cache index == the token's position.

    self_kv:  [num_layers, 2, num_slots, num_heads, max_positions, head_dim]
    cross_kv: [num_layers, 2, num_slots, num_heads, max_prefix + max_source, head_dim] (BART only)
    Zero-initialised: masked-out entries are read by the attention matmul (with weight 0), so they must
    never hold NaN/Inf. A request whose numbers broke may have written NaN/Inf into its own slot: the
    runner clears a slot's written entries when its sequence leaves, so the next occupant reads zeros.
    """

    def __init__(
        self, shape: BackboneShape, num_slots: int, max_positions: int, cross_len: int, device, dtype
    ):
        dims = (shape.num_layers, 2, num_slots, shape.num_heads)
        self.self_kv = torch.zeros(*dims, max_positions, shape.head_dim, device=device, dtype=dtype)
        self.cross_kv = (
            torch.zeros(*dims, cross_len, shape.head_dim, device=device, dtype=dtype) if cross_len else None
        )

    @property
    def num_bytes(self) -> int:
        total = self.self_kv.numel() * self.self_kv.element_size()
        if self.cross_kv is not None:
            total += self.cross_kv.numel() * self.cross_kv.element_size()
        return total

    def clear(self, slot: int, self_len: int, cross_len: int) -> None:
        """Zero a slot's first entries (what its sequence wrote)."""
        self.self_kv[:, :, slot, :, :self_len] = 0
        if self.cross_kv is not None:
            self.cross_kv[:, :, slot, :, :cross_len] = 0

    def move(self, src: int, dst: int, self_len: int, cross_len: int) -> None:
        """Copy slot src's live entries into slot dst (compaction after a sequence leaves)."""
        self.self_kv[:, :, dst, :, :self_len] = self.self_kv[:, :, src, :, :self_len]
        if self.cross_kv is not None:
            self.cross_kv[:, :, dst, :, :cross_len] = self.cross_kv[:, :, src, :, :cross_len]


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
    backbone_cls = GPT2Backbone if config.model_type == "gpt2" else BartBackbone
    return backbone_cls(model, tokenizer, rules, name=path.name)
