"""The shipped demo backbone and demo prefixes: small, loadable, servable, and they do their task."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefix_store.format import load_prefix, validate
from trainer.backbone import load_backbone
from trainer.decode import greedy

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = ROOT / "models" / "demo-gpt2"
PREFIXES = ROOT / "models" / "demo-prefixes"


@pytest.fixture(scope="module")
def demo_backbone():
    return load_backbone(BACKBONE)


def test_demo_backbone_is_small_and_complete(demo_backbone) -> None:
    weights = sum(f.stat().st_size for f in BACKBONE.glob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024
    assert demo_backbone.model_type == "gpt2"
    assert demo_backbone.tokenizer.eos_token == "<|endoftext|>"
    assert demo_backbone.model.config.eos_token_id == demo_backbone.eos_token_id


@pytest.mark.parametrize("name", ["e2e", "webnlg"])
def test_demo_prefixes_validate_against_the_demo_backbone(name: str, demo_backbone) -> None:
    prefix = load_prefix((PREFIXES / f"{name}.safetensors").read_bytes())
    validate(prefix, demo_backbone.shape)
    assert prefix.prompt_template == " {source} <|endoftext|>"
    assert prefix.extra_metadata["x-base-model"] == "demo-gpt2"


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("e2e", "name : The Punter | Type : restaurant | food : Italian | area : riverside"),
        ("webnlg", "Aarhus Airport : cityServed : Aarhus , Denmark"),
    ],
)
def test_demo_prefixes_write_one_sentence_and_stop(name: str, source: str, demo_backbone) -> None:
    """A smoke test, not a quality bar (docs/quality.md has the figures): the prefix makes the backbone write
    task-style text for the source and end it with EOS well before the token limit."""
    prefix = load_prefix((PREFIXES / f"{name}.safetensors").read_bytes())
    prompt = demo_backbone.prompt_ids(source, prefix.prompt_template)
    tokens = greedy(demo_backbone, prefix.targets, prompt, 80)
    text = demo_backbone.tokenizer.decode(tokens)
    assert 3 <= len(tokens) < 80, text
    assert text.startswith(" ") and text.strip().endswith("."), text
