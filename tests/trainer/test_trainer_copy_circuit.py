"""The demo backbone's recipe (scripts/plant_copy.py, scripts/copy_probes.py): a planted induction circuit copies
before any training, and the probes can tell a model that copies from one that does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from copy_probes import invented_names, repeat_accuracy  # noqa: E402
from plant_copy import plant_induction  # noqa: E402


def _gpt2(vocab: int = 2000, positions: int = 128) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=256, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def test_a_random_gpt2_does_not_copy() -> None:
    assert repeat_accuracy(_gpt2(), 2000, eos_id=0, count=10) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_the_planted_circuit_copies_a_repeated_random_sequence(seed: int) -> None:
    model = _gpt2()
    plant_induction(model, seed=seed)
    assert repeat_accuracy(model, 2000, eos_id=0, count=10, seed=seed) > 0.95


def test_the_planted_circuit_copies_at_shifted_positions() -> None:
    """A prefix moves the real tokens to positions P, P+1, ...: the previous-token head is relative."""
    model = _gpt2()
    plant_induction(model)
    g = torch.Generator().manual_seed(3)
    span = torch.randint(1, 2000, (4, 20), generator=g)
    ids = torch.cat([span, span], dim=1)
    positions = torch.arange(30, 70).expand(4, -1)
    with torch.no_grad():
        guesses = model(input_ids=ids, position_ids=positions).logits.argmax(-1)[:, 20:39]
    assert (guesses == ids[:, 21:40]).float().mean().item() > 0.9


def test_invented_names_avoid_the_forbidden_text() -> None:
    names = invented_names(20, seed=1)
    forbidden = " ".join(n.split()[0] for n in names[:5])
    fresh = invented_names(20, seed=1, forbidden=forbidden)
    assert not any(word in forbidden for name in fresh for word in name.split())
    assert len(set(fresh)) == 20
    assert invented_names(20, seed=1, forbidden=forbidden) == fresh  # deterministic
