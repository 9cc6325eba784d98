"""The forward passes never wait on the device: no op whose output size or value the host must read.

On CUDA each of these ops blocks the engine thread until the device catches up (boolean-mask indexing
needs the count of True values, `.item()` the value). The check runs on CPU by watching the aten ops the
forward dispatches, for a batch mixing prefixes of different lengths with bare rows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefix_store.cache import DevicePrefix
from prefix_store.format import Prefix, save_prefix
from prefix_store.store import make_meta
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams

aten = torch.ops.aten
# aten.item: what .item()/int()/float() dispatch on CPU (_local_scalar_dense is reached below the mode)
SYNCING = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
           aten.item.default, aten.is_nonzero.default}  # fmt: skip


class HostWaits(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.found.append(str(func))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.found.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _prefix(kind: str, model_dir: Path, num_tokens: int, seed: int) -> DevicePrefix:
    backbone = load_backbone(model_dir, "cpu", "float32")
    shape = backbone.shape
    targets = ("decoder",) if kind == "gpt2" else ("encoder", "decoder", "cross")
    g = torch.Generator().manual_seed(seed)
    tensors = {
        t: torch.randn(shape.num_layers, 2, shape.num_heads, num_tokens, shape.head_dim, generator=g)
        for t in targets
    }
    prefix = Prefix(kind, tensors)
    meta = make_meta(f"t/p{seed}", prefix, save_prefix(prefix), "native", False)
    return DevicePrefix(meta=meta, targets=tensors, num_bytes=prefix.num_bytes)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_prefill_encode_and_decode_never_wait_on_the_device(kind, tiny_gpt2_dir: Path, tiny_bart_dir: Path):
    model_dir = tiny_gpt2_dir if kind == "gpt2" else tiny_bart_dir
    backbone = load_backbone(model_dir, "cpu", "float32")
    mode = HostWaits()
    for name in ("prefill", "encode", "decode"):
        method = getattr(backbone, name, None)
        if method is not None:

            def watched(*args, _method=method, **kwargs):
                with mode:
                    return _method(*args, **kwargs)

            setattr(backbone, name, watched)
    engine = Engine(backbone, EngineConfig(max_num_seqs=4))
    prefixes = [None, _prefix(kind, model_dir, 3, 1), _prefix(kind, model_dir, 7, 2)]
    prompts = ["hello there", "the coffee shop", "a", "name : Blue Spice | area : city centre"]

    async def run() -> None:
        requests = [
            engine.add(engine.tokenize(p), SamplingParams(max_new_tokens=4), prefixes[i % 3], None)
            for i, p in enumerate(prompts)
        ]
        for request in requests:
            async for _ in engine.stream(request):
                pass

    engine.start()
    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert engine.num_steps > 1
    assert mode.found == []
