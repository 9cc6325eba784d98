"""Shared by the hard-edge server tests: native prefix files for the tiny GPT-2, PEFT adapters, assertions."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as st_save

from prefix_store.format import Prefix, save_prefix

# tests/tiny_models.build_gpt2 defaults: 2 layers, 4 heads, n_embd 64 -> head_dim 16, 128 positions
GPT2_SHAPE = (2, 4, 16)
ADMIN_KEY = "edge-admin-key-0123456789"


def native_prefix(
    num_virtual_tokens: int = 4,
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    fill: float | None = None,
    seed: int = 0,
) -> bytes:
    """A native prefix file: decoder tensor [num_layers, 2, num_heads, P, head_dim]."""
    shape = (num_layers, 2, num_heads, num_virtual_tokens, head_dim)
    if fill is None:
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    else:
        tensor = torch.full(shape, fill).to(dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return raw_native({"decoder": tensor})  # save_prefix refuses to write what the server must refuse
    return save_prefix(Prefix(model_type="gpt2", targets={"decoder": tensor}))


def raw_native(tensors: dict[str, torch.Tensor], model_type: str = "gpt2") -> bytes:
    """A native-looking file written by safetensors itself, with any dtype (for files other tools produce)."""
    first = next(iter(tensors.values()))
    num_layers, _, num_heads, num_tokens, head_dim = first.shape
    metadata = {
        "format": "prefixserve",
        "format_version": "1",
        "model_type": model_type,
        "num_layers": str(num_layers),
        "num_heads": str(num_heads),
        "head_dim": str(head_dim),
        "num_virtual_tokens": str(num_tokens),
        "targets": ",".join(tensors),
    }
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def peft_adapter(model_dir: Path, out: Path, num_virtual_tokens: int = 4) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a PEFT prefix-tuning adapter for model_dir."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    get_peft_model(model, config).save_pretrained(out)
    return (out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes()


def put_native(client: httpx.Client, prefix_id: str, data: bytes, **params: str) -> httpx.Response:
    headers = {"content-type": "application/octet-stream"}
    return client.put(f"/v1/prefixes/{prefix_id}", content=data, headers=headers, params=params)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """A JSON error {"error": {"code", "message"}} with this status (and code)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and re.fullmatch(r"[a-z0-9_]+", body["error"]["code"])
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def metric(client: httpx.Client, name: str) -> float:
    """One unlabelled sample from /metrics."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
