"""Full fine-tuning on the same data and loss, for comparison with prefix-tuning (docs/quality.md).

Every backbone weight is trained; no prefix is used (positions start at 0), so the same decoding and BLEU code
evaluates it with `prefix=None`. It writes nothing servable: it is the baseline, not a product.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from trainer.backbone import Backbone
from trainer.data import Example
from trainer.train import TrainConfig, featurize, micro_batches, total_steps


def finetune(backbone: Backbone, examples: list[Example], config: TrainConfig) -> list[float]:
    """Train all of backbone.model in place; returns the per-step training losses. Leaves it frozen again."""
    torch.manual_seed(config.seed)
    template = config.template or backbone.default_template()
    features = featurize(backbone, examples, template, 0)
    steps = total_steps(len(features), config)
    params = list(backbone.model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    per_epoch = len(micro_batches(features, config, 0))
    losses: list[float] = []
    bar = tqdm(total=steps, desc="fine-tune", disable=not config.show_progress)
    started, seen = time.time(), 0
    for step in range(steps):
        batches = []
        for index in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, offset = divmod(index, per_epoch)
            batches.append(backbone.collate(micro_batches(features, config, epoch)[offset]))
        num_target = sum(int((b["labels"] != -100).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss_sum, _ = backbone.loss(batch, None)
            (loss_sum / num_target).backward()
            total += loss_sum.item()
            seen += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / num_target)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{seen / max(time.time() - started, 1e-9):.0f}")
    bar.close()
    backbone.freeze()
    return losses
