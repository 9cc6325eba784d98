"""The shipped demo backbone and demo prefixes: small, loadable, servable, and they do their task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prefix_store.format import load_prefix, validate
from trainer.backbone import load_backbone
from trainer.decode import greedy

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = ROOT / "models" / "demo-gpt2"
PREFIXES = ROOT / "models" / "demo-prefixes"
sys.path.insert(0, str(ROOT / "scripts"))
from copy_probes import repeat_accuracy  # noqa: E402


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


SOURCES = {
    "e2e": [
        "name : The Punter | Type : restaurant | food : Italian | area : riverside",
        "name : Blue Spice | Type : coffee shop | area : city centre",
        "name : Zizzi | Type : pub | food : English | customer rating : high",
        "name : The Mill | Type : restaurant | food : French | price : cheap | area : city centre",
        "name : Cotto | Type : coffee shop | family friendly : yes | near : The Portland Arms",
        "name : Aromi | Type : restaurant | food : Chinese | area : riverside",
        "name : The Golden Curry | food : Indian | customer rating : low | family friendly : no",
        "name : Loch Fyne | Type : restaurant | food : Japanese | price : moderate",
    ],
    "webnlg": [
        "Aarhus Airport : cityServed : Aarhus , Denmark",
        "Alan Bean : nationality : United States",
        "Amsterdam Airport Schiphol : elevationAboveTheSeaLevel : -3.3528",
        "Abilene , Texas : country : United States",
        "Alan Shepard : occupation : Test pilot",
        "Ajoblanco : country : Spain",
        "Acharya Institute of Technology : city : Bangalore",
        "Aaron Turner : instrument : Electric guitar",
    ],
}
MIN_STOPPED = {"e2e": 6, "webnlg": 5}  # of 8 (shipped: 8 and 6; scripts/train_demo_prefixes.py)


@pytest.mark.parametrize("name", ["e2e", "webnlg"])
def test_demo_prefixes_mostly_write_one_sentence_and_stop(name: str, demo_backbone) -> None:
    """A smoke test, not a quality bar (docs/quality.md has the figures): the prefix makes the backbone write
    task-style text and end it with EOS before the token limit -- for most sources: the small demo backbone
    loops until the limit on some (README, docs/quality.md)."""
    prefix = load_prefix((PREFIXES / f"{name}.safetensors").read_bytes())
    stopped = []
    for source in SOURCES[name]:
        tokens = greedy(
            demo_backbone, prefix.targets, demo_backbone.prompt_ids(source, prefix.prompt_template), 80
        )
        text = demo_backbone.tokenizer.decode(tokens)
        assert text.startswith(" ") and len(tokens) >= 3, text
        stopped.append(len(tokens) < 80 and text.strip().endswith("."))
    assert sum(stopped) >= MIN_STOPPED[name], stopped


def test_demo_backbone_copies_from_its_context(demo_backbone) -> None:
    """The ability the demo prefixes rely on (docs/quality.md: copy probes): a random token sequence, repeated,
    is continued from the first copy."""
    tokenizer = demo_backbone.tokenizer
    accuracy = repeat_accuracy(demo_backbone.model, len(tokenizer), tokenizer.eos_token_id, count=10)
    assert accuracy > 0.9


def test_demo_e2e_names_the_venue_of_the_readme_example(demo_backbone) -> None:
    """The README's curl: the answer names the venue of the MR, a name the backbone must copy from the prompt."""
    prefix = load_prefix((PREFIXES / "e2e.safetensors").read_bytes())
    prompt = demo_backbone.prompt_ids(
        "name : Blue Spice | Type : coffee shop | area : city centre", prefix.prompt_template
    )
    text = demo_backbone.tokenizer.decode(greedy(demo_backbone, prefix.targets, prompt, 80))
    assert "Blue Spice" in text, text
