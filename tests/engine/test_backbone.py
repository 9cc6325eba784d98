"""Loading: a local GPT-2 / BART directory, frozen; anything else refused with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from server.engine.backbone import BackboneError, load_backbone


def test_missing_directory_is_refused(tmp_path: Path):
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path / "nothing")


def test_other_architectures_are_refused(tmp_path: Path):
    GPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]]
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="gpt_neo.*not supported"):
        load_backbone(tmp_path)


def test_backbone_is_frozen_and_shaped(tiny_gpt2_dir: Path, tiny_bart_dir: Path):
    gpt2 = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    assert not any(p.requires_grad for p in gpt2.model.parameters()) and not gpt2.model.training
    assert (gpt2.shape.num_layers, gpt2.shape.num_heads, gpt2.shape.head_dim) == (2, 4, 16)
    bart = load_backbone(tiny_bart_dir, "cpu", "bfloat16")
    assert bart.dtype.is_floating_point and str(bart.dtype) == "torch.bfloat16"
    assert bart.rules.forced_eos_token_id == bart.tokenizer.eos_token_id


def test_cuda_asked_without_cuda_is_a_clear_error(tiny_gpt2_dir: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackboneError, match="no CUDA device"):
        load_backbone(tiny_gpt2_dir, "cuda")
