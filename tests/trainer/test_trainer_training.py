"""The training loop: only the prefix learns, the backbone stays bit-identical, the loss goes down, BART gets
all three targets, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefix_store.format import load_prefix, save_prefix, validate
from trainer.backbone import load_backbone
from trainer.data import Example
from trainer.train import TrainConfig, train_prefix

EXAMPLES = [
    Example(
        "name : Blue Spice | Type : coffee shop | area : city centre",
        "The Blue Spice coffee shop is in the city centre .",
    ),
    Example(
        "name : Alimentum | area : city centre | family friendly : no",
        "There is a place in the city centre , Alimentum , that is not family - friendly .",
    ),
    Example("Aarhus Airport : cityServed : Aarhus , Denmark", "Aarhus Airport serves Aarhus , Denmark ."),
] * 4

FAST = {"batch_size": 4, "learning_rate": 5e-3, "show_progress": False, "mid_dim": 32}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_bart_dir"])
def test_only_prefix_learns_and_backbone_is_bit_identical(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    backbone = load_backbone(request.getfixturevalue(fixture))
    before = _snapshot(backbone.model)
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=3, **FAST))
    assert all(not p.requires_grad and p.grad is None for p in backbone.model.parameters())
    assert all(p.requires_grad for p in result.tuner.parameters())
    after = backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_prefix_receives_gradients(tiny_gpt2_dir: Path) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=1, **FAST))
    batch = backbone.collate([backbone.featurize(EXAMPLES[0], result.template)])
    loss, count = backbone.loss(batch, result.tuner())
    (loss / count).backward()
    grads = [p.grad for p in result.tuner.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_bart_dir"])
def test_short_run_lowers_training_loss(fixture: str, request: pytest.FixtureRequest) -> None:
    backbone = load_backbone(request.getfixturevalue(fixture))
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=25, **{**FAST, "learning_rate": 3e-2}))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses


def test_bart_exports_three_valid_targets(tiny_bart_dir: Path) -> None:
    backbone = load_backbone(tiny_bart_dir)
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=2, num_virtual_tokens=3, **FAST))
    prefix = load_prefix(save_prefix(result.tuner.export(prompt_template=result.template)))
    assert prefix.target_names() == ["encoder", "decoder", "cross"]
    assert prefix.prompt_template == "{source}"
    validate(prefix, backbone.shape)
    for tensor in prefix.targets.values():
        assert tuple(tensor.shape) == (2, 2, 4, 3, 16)  # [L, 2, H, P, d] of the tiny BART


def test_gpt2_export_keeps_template_and_validates(tiny_gpt2_dir: Path) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=1, **FAST))
    prefix = load_prefix(save_prefix(result.tuner.export(prompt_template=result.template)))
    assert prefix.target_names() == ["decoder"]
    assert prefix.prompt_template == " {source} <|endoftext|>"
    validate(prefix, backbone.shape)


def test_resume_ends_where_an_uninterrupted_run_does(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    config = TrainConfig(max_steps=6, grad_accum=2, warmup_steps=2, save_every=3, **FAST)
    straight = train_prefix(backbone, EXAMPLES, config).tuner()

    checkpoint = tmp_path / "run.checkpoint.pt"
    real_loss, calls = backbone.loss, []

    def crashing_loss(
        batch, prefix
    ):  # dies in step 4 (2 micro-batches per step), after the step-3 checkpoint
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return real_loss(batch, prefix)

    monkeypatch.setattr(backbone, "loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        train_prefix(backbone, EXAMPLES, config, checkpoint=checkpoint)
    monkeypatch.setattr(backbone, "loss", real_loss)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    resumed = train_prefix(backbone, EXAMPLES, config, checkpoint=checkpoint, resume=True)
    assert resumed.steps == 6
    for name, tensor in resumed.tuner().items():
        torch.testing.assert_close(tensor, straight[name], rtol=1e-5, atol=1e-6)


def test_init_from_real_words_fits_the_activations(tiny_bart_dir: Path) -> None:
    """--init-text: each target starts as the backbone's own keys and values of that text (paper §7.2), so
    after one training step it is still far closer to them than a randomly initialised prefix is."""
    from trainer.train import _take

    backbone = load_backbone(tiny_bart_dir)
    text = "table to text :"
    config = {"max_steps": 1, **FAST}
    fitted = train_prefix(backbone, EXAMPLES, TrainConfig(init_text=text, init_steps=200, **config)).tuner()
    random = train_prefix(backbone, EXAMPLES, TrainConfig(**config)).tuner()
    assert set(fitted) == {"encoder", "decoder", "cross"}
    num_tokens = fitted["decoder"].shape[3]
    for name, activations in backbone.activations(text).items():
        target = _take(activations, num_tokens)
        fitted_mse = torch.nn.functional.mse_loss(fitted[name], target).item()
        random_mse = torch.nn.functional.mse_loss(random[name], target).item()
        # measured: ~0.008 fitted vs ~0.48 random, activations' mean square ~0.41
        assert fitted_mse < 0.1 * random_mse and fitted_mse < 0.1 * target.pow(2).mean().item(), name
