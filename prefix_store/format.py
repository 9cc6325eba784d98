"""The native prefix file, PEFT import, and validation against a backbone (the spec: docs/formats.md).

A native file is safetensors, format version 1: one tensor per target (``decoder``, ``encoder``, ``cross``),
each ``[num_layers, 2, num_heads, P, head_dim]`` (index 1: 0 = key, 1 = value; ``num_heads`` counts key/value
heads, fewer than query heads under grouped-query attention), all with the same ``P`` and dtype, and string
``__metadata__`` describing the backbone it fits plus an optional ``prompt_template``. Real tokens of the
decoder-only families and of the BART decoder start at position P (as PEFT does); the BART encoder is not
shifted; prefix positions are never masked; rotary families store prefix keys unrotated (as PEFT does).
The trainer saves through this module and the server loads through it, so the two cannot disagree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

FORMAT_NAME = "prefixserve"
FORMAT_VERSION = "1"
TARGETS_BY_MODEL = {
    "gpt2": ("decoder",),
    "bart": ("encoder", "decoder", "cross"),
    "llama": ("decoder",),
    "qwen2": ("decoder",),
    "mistral": ("decoder",),
}
# decoder-only families: PEFT's CAUSAL_LM layout is the same for all of them (per key/value head)
CAUSAL_MODEL_TYPES = tuple(k for k, v in TARGETS_BY_MODEL.items() if v == ("decoder",))
ALLOWED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_MAX_VIRTUAL_TOKENS = 256
# Largest |value| a served prefix may hold. Trained prefixes hold keys and values of a few tens at most;
# 1e4 leaves two orders of magnitude of room and keeps q.k and softmax(.)V far from overflow in float32
# and bfloat16, and every value representable in float16 (max 65504).
DEFAULT_MAX_PREFIX_VALUE = 1e4


class PrefixFormatError(ValueError):
    """The bytes or tensors are not a prefix this backbone can serve. The message says how to fix it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BackboneShape:
    """What a prefix must match: the loaded backbone's architecture."""

    model_type: str  # "gpt2" | "bart" | "llama" | "qwen2" | "mistral"
    num_layers: int
    num_heads: int  # query heads
    head_dim: int
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: as many as num_heads

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        """Heads a prefix (and the KV cache) holds: the file's `num_heads` is this number."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclass
class Prefix:
    """A prefix in memory: per-target tensors `[num_layers, 2, num_heads, P, head_dim]`."""

    model_type: str
    targets: dict[str, torch.Tensor]
    prompt_template: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return next(iter(self.targets.values())).shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.targets.values())).dtype

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.targets.values())

    def target_names(self) -> list[str]:
        order = TARGETS_BY_MODEL.get(self.model_type, ())
        return [t for t in order if t in self.targets]


def save_prefix(prefix: Prefix) -> bytes:
    """Serialise a prefix to native-file bytes (the trainer and the server both use this)."""
    first = next(iter(prefix.targets.values()))
    num_layers, _, num_heads, num_tokens, head_dim = first.shape
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": prefix.model_type,
        "num_layers": str(num_layers),
        "num_heads": str(num_heads),
        "head_dim": str(head_dim),
        "num_virtual_tokens": str(num_tokens),
        "targets": ",".join(prefix.target_names()),
        **{k: v for k, v in prefix.extra_metadata.items() if k.startswith("x-")},
    }
    if prefix.prompt_template is not None:
        metadata["prompt_template"] = prefix.prompt_template
    return _serialize({name: t.detach().contiguous().cpu() for name, t in prefix.targets.items()}, metadata)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (sorted keys), so equal prefixes hash equal.

    (safetensors' own writer orders __metadata__ at random, which would change sha256 on every save.)
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise PrefixFormatError(
                "wrong_dtype", f"target {name!r} is {tensor.dtype}; use float32/float16/bfloat16"
            )
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian hosts only (x86, arm)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs)


def _read_safetensors(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes without trusting them: header checked, no pickle anywhere."""
    if len(data) < 8:
        raise PrefixFormatError("invalid_safetensors", f"{what} is {len(data)} bytes; not a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise PrefixFormatError(
            "invalid_safetensors",
            f"{what} is not a safetensors file (bad header length); upload the file as saved",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise PrefixFormatError(
            "invalid_safetensors",
            f"{what} is not a valid safetensors file ({exc}); upload the file unmodified",
        ) from exc
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise PrefixFormatError("invalid_safetensors", f"{what} has a malformed __metadata__ block")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def load_prefix(data: bytes) -> Prefix:
    """Parse native-file bytes. Shapes are checked against each other here, against a backbone by validate()."""
    tensors, metadata = _read_safetensors(data, "the prefix file")
    if metadata.get("format") != FORMAT_NAME:
        raise PrefixFormatError(
            "not_a_prefix_file",
            "the file's metadata lacks format=prefixserve; upload a native prefix file, or a PEFT adapter as "
            "multipart with parts adapter_model and adapter_config",
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PrefixFormatError(
            "unsupported_format_version",
            f"format_version {metadata.get('format_version')!r} is not supported; this server reads {FORMAT_VERSION}",
        )
    model_type = metadata.get("model_type", "")
    allowed = TARGETS_BY_MODEL.get(model_type)
    if allowed is None:
        raise PrefixFormatError(
            "wrong_model_type", f"model_type {model_type!r} must be one of {', '.join(TARGETS_BY_MODEL)}"
        )
    unknown = sorted(set(tensors) - set(allowed))
    if unknown or not tensors:
        raise PrefixFormatError(
            "bad_targets",
            f"a {model_type} prefix holds tensors named {', '.join(allowed)} (at least one); found {sorted(tensors)}",
        )
    return Prefix(
        model_type=model_type,
        targets=tensors,
        prompt_template=metadata.get("prompt_template"),
        extra_metadata={k: v for k, v in metadata.items() if k.startswith("x-")},
    )


def import_peft(config_json: bytes, weights: bytes, causal_model_type: str = "gpt2") -> Prefix:
    """Convert a PEFT prefix-tuning adapter to a native prefix, placed exactly as PEFT applies it.

    PEFT saves `prompt_embeddings` `[P, 2*L*D]`. Causal LM: view `[P, 2L, H, D/H]`, layer l takes
    key = slot 2l, value = slot 2l+1; for grouped-query attention PEFT writes H = the key/value heads and
    D = H * head_dim, so the same view holds. The adapter does not name its architecture:
    `causal_model_type` (the serving backbone's, when decoder-only) labels a CAUSAL_LM adapter.
    Seq2seq: PEFT concatenates the 2L slots with themselves before splitting, so decoder layer l takes
    key = slot (4l) mod 2L and value = slot (4l+1) mod 2L, and only the decoder self-attention gets a prefix.
    """
    try:
        config = json.loads(config_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise PrefixFormatError("invalid_adapter_config", f"adapter_config is not JSON ({reason})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixFormatError(
            "unsupported_adapter",
            "adapter_config.peft_type must be PREFIX_TUNING; other PEFT methods (LoRA, prompt tuning) are not prefixes",
        )
    task_type = config.get("task_type")
    causal = causal_model_type if causal_model_type in CAUSAL_MODEL_TYPES else "gpt2"
    model_type = {"CAUSAL_LM": causal, "SEQ_2_SEQ_LM": "bart"}.get(str(task_type))
    if model_type is None:
        raise PrefixFormatError(
            "unsupported_adapter", f"task_type {task_type!r} must be CAUSAL_LM or SEQ_2_SEQ_LM"
        )
    num_tokens, num_layers, token_dim, num_heads = (
        _config_int(config, name)
        for name in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")
    )
    if token_dim % num_heads:
        raise PrefixFormatError(
            "invalid_adapter_config", "token_dim must be divisible by num_attention_heads"
        )
    tensors, _ = _read_safetensors(weights, "adapter_model")
    embeddings = tensors.get("prompt_embeddings")
    expected = (num_tokens, 2 * num_layers * token_dim)
    if embeddings is None or tuple(embeddings.shape) != expected:
        found = None if embeddings is None else tuple(embeddings.shape)
        raise PrefixFormatError(
            "shape_mismatch",
            f"adapter_model must hold prompt_embeddings shaped {list(expected)} for this adapter_config; found {found}",
        )
    head_dim = token_dim // num_heads
    # [P, 2L*D] -> [P, 2L, H, d] -> [2L, H, P, d]
    slots = embeddings.view(num_tokens, 2 * num_layers, num_heads, head_dim).permute(1, 2, 0, 3)
    if model_type != "bart":
        keys, values = slots[0::2], slots[1::2]
    else:
        layer = torch.arange(num_layers)
        keys = slots[(4 * layer) % (2 * num_layers)]
        values = slots[(4 * layer + 1) % (2 * num_layers)]
    decoder = torch.stack([keys, values], dim=1).contiguous()  # [L, 2, H, P, d]
    return Prefix(model_type=model_type, targets={"decoder": decoder})


def _config_int(config: dict, name: str) -> int:
    """An integer field of adapter_config (PEFT writes plain JSON integers; 1e400 or "12" are not)."""
    value = config.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 12.0: what some JSON writers produce
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise PrefixFormatError(
            "invalid_adapter_config",
            f"adapter_config.{name} must be a positive integer below 2^31; found {str(value)[:40]!r}",
        )
    return value


def validate(
    prefix: Prefix,
    backbone: BackboneShape,
    max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
    max_value: float = DEFAULT_MAX_PREFIX_VALUE,
) -> None:
    """Refuse anything the backbone cannot serve exactly. Raises PrefixFormatError saying what to fix."""
    if prefix.model_type != backbone.model_type:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in prefix.targets.items())
        raise PrefixFormatError(
            "wrong_model_type",
            f"the prefix is for a {prefix.model_type} backbone ({shapes}) but the server runs a "
            f"{backbone.model_type} backbone, whose prefixes are shaped {_wanted(backbone)} "
            f"({', '.join(TARGETS_BY_MODEL[backbone.model_type])})",
        )
    allowed = TARGETS_BY_MODEL[backbone.model_type]
    expected_head = (backbone.num_layers, 2, backbone.kv_heads)
    num_tokens: int | None = None
    dtype: torch.dtype | None = None
    for name, tensor in prefix.targets.items():
        if name not in allowed:
            raise PrefixFormatError("bad_targets", f"target {name!r} is not one of {', '.join(allowed)}")
        if tensor.dtype not in ALLOWED_DTYPES:
            raise PrefixFormatError(
                "wrong_dtype", f"target {name!r} is {tensor.dtype}; save it as float32, float16 or bfloat16"
            )
        shape = tuple(tensor.shape)
        if len(shape) != 5 or shape[:3] != expected_head or shape[4] != backbone.head_dim:
            want = _wanted(backbone)
            raise PrefixFormatError(
                "shape_mismatch",
                f"target {name!r} is shaped {list(shape)}; this backbone needs {want} "
                f"({backbone.num_layers} layers, {backbone.kv_heads} heads, head_dim {backbone.head_dim})",
            )
        if num_tokens is not None and shape[3] != num_tokens:
            raise PrefixFormatError(
                "shape_mismatch", "all targets must have the same number of virtual tokens P"
            )
        if dtype is not None and tensor.dtype != dtype:
            raise PrefixFormatError("wrong_dtype", "all targets must have the same dtype")
        num_tokens, dtype = shape[3], tensor.dtype
        if not bool(torch.isfinite(tensor).all()):
            raise PrefixFormatError(
                "non_finite_values", f"target {name!r} contains NaN or Inf; retrain or re-export the prefix"
            )
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > max_value:
            raise PrefixFormatError(
                "value_out_of_range",
                f"target {name!r} holds a value of magnitude {largest:.3g}; this server accepts at most "
                f"{max_value:g} (PREFIXSERVE_MAX_PREFIX_VALUE). Trained prefixes stay far below it: check "
                "the export (scale, dtype)",
            )
    assert num_tokens is not None
    if not 1 <= num_tokens <= max_virtual_tokens:
        raise PrefixFormatError(
            "prefix_too_long",
            f"the prefix has {num_tokens} virtual tokens; this server accepts 1 to {max_virtual_tokens} "
            "(PREFIXSERVE_MAX_PREFIX_TOKENS)",
        )
    if prefix.prompt_template is not None and "{source}" not in prefix.prompt_template:
        raise PrefixFormatError(
            "bad_prompt_template", "prompt_template must contain the placeholder {source}"
        )


def _wanted(backbone: BackboneShape) -> list[int | str]:
    """The shape every target must have on this backbone: [layers, 2, key/value heads, P, head_dim]."""
    return [backbone.num_layers, 2, backbone.kv_heads, "P", backbone.head_dim]


def apply_template(template: str | None, source: str) -> str:
    """Fill a prefix's prompt template: a client sends only the source."""
    return source if template is None else template.replace("{source}", source)


def count_parameters(prefix: Prefix) -> int:
    return sum(math.prod(t.shape) for t in prefix.targets.values())
