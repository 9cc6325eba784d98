"""make serve seeds the shipped demo prefixes as public demo/<name>, once, skipping files that do not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from prefix_store.format import BackboneShape, Prefix, save_prefix
from prefix_store.local import LocalStore
from server.demo import backbone_shape, seed_demo_prefixes


def test_seed_is_public_idempotent_and_skips_misfits(tmp_path: Path, tiny_gpt2_dir: Path):
    shape = backbone_shape(tiny_gpt2_dir)
    assert shape == BackboneShape("gpt2", 2, 4, 16)
    demo = tmp_path / "demo-prefixes"
    demo.mkdir()
    fits = torch.randn(2, 2, 4, 5, 16)
    (demo / "e2e.safetensors").write_bytes(
        save_prefix(Prefix("gpt2", {"decoder": fits}, " {source} <|endoftext|>"))
    )
    (demo / "wrong.safetensors").write_bytes(
        save_prefix(Prefix("gpt2", {"decoder": torch.randn(3, 2, 4, 5, 16)}))
    )
    store = LocalStore(tmp_path / "store")
    assert seed_demo_prefixes(store, shape, demo) == ["demo/e2e"]
    meta = store.get_meta("demo/e2e")
    assert meta.public and meta.prompt_template == " {source} <|endoftext|>"
    assert seed_demo_prefixes(store, shape, demo) == ["demo/e2e"]
    assert store.get_meta("demo/e2e").updated_at == meta.updated_at  # unchanged bytes are not rewritten
    assert store.get_meta("demo/wrong") is None
