"""The prefix-tuning loop: AdamW + linear schedule over the prefix parameters only, loss on the target only,
gradient accumulation, a tqdm bar, checkpoints that resume to the same result as an uninterrupted run."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from trainer.backbone import Backbone, Features
from trainer.data import Example
from trainer.prefix_model import PrefixTuner

log = logging.getLogger("prefix-train")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow the paper's E2E row (ACL Table 6): lr 8e-5, 5 epochs, batch 10, prefix length 5."""

    num_virtual_tokens: int = 5
    mid_dim: int = 512
    learning_rate: float = 8e-5
    epochs: float = 5.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 10
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 200  # optimizer steps between checkpoints (0: only at the end)
    init_text: str | None = None
    init_steps: int = 300
    template: str | None = None  # None: the backbone's default
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1 or self.mid_dim < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("num_virtual_tokens, mid_dim, batch_size and grad_accum must be >= 1")
        if self.template is not None and "{source}" not in self.template:
            raise ValueError("the template must contain {source}")


@dataclass
class TrainResult:
    tuner: PrefixTuner
    template: str
    steps: int
    last_loss: float
    losses: list[float] = field(default_factory=list)


def featurize(
    backbone: Backbone, examples: list[Example], template: str, num_virtual_tokens: int
) -> list[Features]:
    """Tokenise; drop (and count) examples that do not fit the backbone's positions after the prefix."""
    features, dropped = [], 0
    for example in examples:
        f = backbone.featurize(example, template)
        if not backbone.fits(f, num_virtual_tokens):
            dropped += 1
            continue
        features.append(f)
    if dropped:
        log.warning("dropped %d of %d examples longer than the backbone's %d positions",
                    dropped, len(examples), backbone.max_positions)  # fmt: skip
    if not features:
        raise ValueError("no training example fits the backbone")
    return features


def micro_batches(features: list[Features], config: TrainConfig, epoch: int) -> list[list[Features]]:
    """The epoch's shuffled micro-batches; the order depends only on (seed, epoch), so resuming replays it."""
    order = list(range(len(features)))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    size = config.batch_size
    return [[features[i] for i in order[start : start + size]] for start in range(0, len(order), size)]


def total_steps(num_features: int, config: TrainConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(num_features / config.batch_size) / config.grad_accum
    return max(1, math.ceil(per_epoch * config.epochs))


def save_checkpoint(path: Path, tuner: PrefixTuner, optimizer, scheduler, step: int, config: TrainConfig,
                    template: str) -> None:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"tuner": tuner.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "config": asdict(config),
                "template": template}, tmp)  # fmt: skip
    tmp.replace(path)  # never leave a half-written checkpoint behind


def train_prefix(backbone: Backbone, examples: list[Example], config: TrainConfig,
                 checkpoint: Path | None = None, resume: bool = False) -> TrainResult:  # fmt: skip
    torch.manual_seed(config.seed)
    template = config.template or backbone.default_template()
    tuner = PrefixTuner(backbone.shape, backbone.targets, config.num_virtual_tokens, config.mid_dim)
    tuner.to(backbone.device)
    if config.init_text and not resume:
        activations = {
            name: _take(t, config.num_virtual_tokens)
            for name, t in backbone.activations(config.init_text).items()
        }
        mse = tuner.fit_to(activations, steps=config.init_steps)
        log.info("prefix initialised from the activations of %r (MSE %.4f)", config.init_text, mse)
    features = featurize(backbone, examples, template, config.num_virtual_tokens)
    steps = total_steps(len(features), config)
    optimizer = torch.optim.AdamW(
        tuner.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    step = 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=backbone.device, weights_only=True)
        _check_compatible(state["config"], config)
        tuner.load_state_dict(state["tuner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, template = state["step"], state["template"]
        log.info("resumed from %s at step %d of %d", checkpoint, step, steps)
    log.info("training %d prefix parameters (backbone frozen: %d), %d examples, %d optimizer steps",
             tuner.num_trainable(), sum(p.numel() for p in backbone.model.parameters()), len(features), steps)  # fmt: skip
    result = TrainResult(tuner, template, step, float("nan"))
    _loop(backbone, tuner, features, config, optimizer, scheduler, result, steps, checkpoint)
    if checkpoint is not None:
        save_checkpoint(checkpoint, tuner, optimizer, scheduler, result.steps, config, template)
    return result


def _loop(backbone: Backbone, tuner: PrefixTuner, features: list[Features], config: TrainConfig, optimizer,
          scheduler, result: TrainResult, steps: int, checkpoint: Path | None) -> None:  # fmt: skip
    per_epoch = len(micro_batches(features, config, 0))
    bar = tqdm(total=steps, initial=result.steps, desc="prefix-train", disable=not config.show_progress)
    started, num_seen = time.time(), 0
    micro = result.steps * config.grad_accum  # micro-batches already consumed
    epochs: dict[int, list[list[Features]]] = {}
    while result.steps < steps:
        group = []
        for index in range(micro, micro + config.grad_accum):
            epoch, offset = divmod(index, per_epoch)
            if epoch not in epochs:
                epochs = {epoch: micro_batches(features, config, epoch)}
            group.append(epochs[epoch][offset])
        micro += config.grad_accum
        batches = [backbone.collate(batch) for batch in group]
        num_target = sum(int((b["labels"] != -100).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            prefix = tuner()
            loss_sum, _ = backbone.loss(batch, prefix)
            (loss_sum / num_target).backward()  # mean over the target tokens of the whole accumulated batch
            total += loss_sum.item()
            num_seen += int(batch["attention_mask"].sum()) + (int((batch["labels"] != -100).sum())
                                                               if "decoder_input_ids" in batch else 0)  # fmt: skip
        torch.nn.utils.clip_grad_norm_(tuner.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps += 1
        result.last_loss = total / num_target
        result.losses.append(result.last_loss)
        bar.update(1)
        bar.set_postfix(
            loss=f"{result.last_loss:.3f}", tok_s=f"{num_seen / max(time.time() - started, 1e-9):.0f}"
        )
        if not config.show_progress and (result.steps % 50 == 0 or result.steps == steps):
            elapsed = time.time() - started
            log.info("step %d/%d loss %.3f lr %.2e (%.1f min)", result.steps, steps, result.last_loss,
                     scheduler.get_last_lr()[0], elapsed / 60)  # fmt: skip
        if checkpoint is not None and config.save_every and result.steps % config.save_every == 0:
            save_checkpoint(checkpoint, tuner, optimizer, scheduler, result.steps, config, result.template)
    bar.close()


def _take(activations: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[L, 2, H, T, d] -> [L, 2, H, P, d]: the first P positions, cycling when the text is shorter than P."""
    index = torch.arange(num_tokens, device=activations.device) % activations.shape[3]
    return activations[:, :, :, index]


def _check_compatible(saved: dict, config: TrainConfig) -> None:
    keys = ("num_virtual_tokens", "mid_dim", "batch_size", "grad_accum", "seed")
    changed = [k for k in keys if saved.get(k) != getattr(config, k)]
    if changed:
        raise ValueError(
            f"the checkpoint was made with different {', '.join(changed)}; use the same settings to resume"
        )
