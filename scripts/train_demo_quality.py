"""The comparisons in docs/quality.md, on the demo backbone and the project's E2E split (trainer.data.e2e_split):
prefix-tuning vs full fine-tuning vs no prefix, and the low-data runs (50/100/200/500 training examples).

    nohup .venv/bin/python scripts/train_demo_quality.py > var/quality/log.txt 2>&1 &

Every run starts from the same frozen demo backbone, trains for a fixed number of optimizer steps on one CPU
thread and is scored by greedy decoding on the first --eval-sources of the 100 held-out MRs, corpus BLEU
against all their references. Results are appended to var/quality/results.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.train_demo_prefixes import NAME_STYLES, rename_venues  # noqa: E402
from trainer.backbone import load_backbone  # noqa: E402
from trainer.data import e2e_split, read_source_target  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.finetune import finetune  # noqa: E402
from trainer.train import TrainConfig, train_prefix  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "demo-gpt2"))
    p.add_argument("--out", type=Path, default=ROOT / "var" / "quality" / "results.jsonl")
    p.add_argument("--eval-sources", type=int, default=100)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of the full-data runs")
    p.add_argument("--low-data-steps", type=int, default=150)
    p.add_argument("--prefix-lr", type=float, default=5e-3)
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--prefix-length", type=int, default=10)
    p.add_argument("--sizes", default="50,100,200,500")
    p.add_argument(
        "--seeds", default="0,1,2", help="low data: one run per seed (subset drawn and training seeded by it)"
    )
    p.add_argument("--methods", default="prefix,finetune", help="low data: which methods to run")
    p.add_argument("--rename-frac", type=float, default=0.5,
                   help="share of training pairs whose venues get invented names, as for the shipped demo/e2e")  # fmt: skip
    p.add_argument("--name-style", choices=sorted(NAME_STYLES), default="words",
                   help="how the renamed venues are invented, as for the shipped demo/e2e")  # fmt: skip
    p.add_argument("--report", action="store_true",
                   help="print the low-data table (mean ± spread over seeds) from --out and exit")  # fmt: skip
    p.add_argument("--only", choices=["full", "full-prefix", "full-finetune", "low"])
    return p.parse_args()


def score(backbone, prefix, heldout, template, args) -> tuple[float, float, list[str]]:
    """BLEU, the share of outputs naming the venue exactly as the MR does, and three sample outputs."""
    ev = evaluate(backbone, prefix, heldout, template, args.eval_sources, num_beams=1, max_new_tokens=60,
                  show_progress=False)  # fmt: skip
    names = [dict(p.partition(" : ")[::2] for p in s.split(" | ")).get("name", "") for s in ev.sources]
    named = sum(bool(n) and n in h for n, h in zip(names, ev.hypotheses, strict=True)) / len(names)
    return ev.bleu, named, ev.hypotheses[:3]


def run_prefix(args, examples, heldout, steps, init_text=None, seed=0) -> dict:
    backbone = load_backbone(args.model)
    config = TrainConfig(num_virtual_tokens=args.prefix_length, learning_rate=args.prefix_lr, max_steps=steps,
                         batch_size=10, warmup_steps=min(30, steps // 10), init_text=init_text, show_progress=False,
                         seed=seed)  # fmt: skip
    started = time.time()
    result = train_prefix(backbone, examples, config)
    bleu, named, samples = score(backbone, result.tuner(), heldout, result.template, args)
    exported = sum(t.numel() for t in result.tuner.export().targets.values())
    return {"method": "prefix", "bleu": bleu, "named": named, "trainable": result.tuner.num_trainable(), "served": exported,
            "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]), "minutes": (time.time() - started) / 60,
            "init_text": init_text, "samples": samples}  # fmt: skip


def run_finetune(args, examples, heldout, steps, seed=0) -> dict:
    backbone = load_backbone(args.model)
    config = TrainConfig(learning_rate=args.finetune_lr, max_steps=steps, batch_size=10,
                         warmup_steps=min(30, steps // 10), show_progress=False, seed=seed)  # fmt: skip
    started = time.time()
    losses = finetune(backbone, examples, config)
    bleu, named, samples = score(backbone, None, heldout, backbone.default_template(), args)
    trainable = sum(p.numel() for p in backbone.model.parameters())
    return {"method": "finetune", "bleu": bleu, "named": named, "trainable": trainable, "served": trainable,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "minutes": (time.time() - started) / 60,
            "samples": samples}  # fmt: skip


def record(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def low_data_table(path: Path) -> str:
    """Markdown: BLEU and venue named per method and training-set size, mean ± half the range over seeds."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("setting") == "low"]
    for r in rows:
        r.setdefault("steps", 150)  # the first runs did not record it: they all ran 150 steps
    sizes = sorted({r["size"] for r in rows})
    kinds = sorted({(r["method"], r["steps"]) for r in rows}, key=lambda k: (k[0] != "prefix", k[1]))

    def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        if not values:
            return "—"
        mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
        return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f} ({len(values)})"

    lines = ["| method | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for method, steps in kinds:
        for what, key, scale in (("BLEU", "bleu", 1.0), ("venue named, %", "named", 100.0)):
            cells = [cell([r[key] for r in rows if (r["method"], r["steps"]) == (method, steps) and r["size"] == size],
                          scale) for size in sizes]  # fmt: skip
            lines.append(f"| {method}, {steps} steps: {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.report:
        print(low_data_table(args.out))
        return
    torch.set_num_threads(1)
    train, heldout = e2e_split(read_source_target(DATA / "e2e" / "valid.txt"))
    train = rename_venues(train, args.rename_frac, style=args.name_style)
    if args.only == "full-prefix":
        record(
            args.out, {"setting": "full", "size": len(train), **run_prefix(args, train, heldout, args.steps)}
        )
    if args.only == "full-finetune":
        record(
            args.out,
            {"setting": "full", "size": len(train), **run_finetune(args, train, heldout, args.steps)},
        )
    if args.only in (None, "full"):
        backbone = load_backbone(args.model)
        bleu, named, samples = score(backbone, None, heldout, backbone.default_template(), args)
        record(args.out, {"setting": "full", "size": len(train), "method": "none", "bleu": bleu, "named": named,
                          "trainable": 0,
                          "samples": samples})  # fmt: skip
        record(
            args.out, {"setting": "full", "size": len(train), **run_prefix(args, train, heldout, args.steps)}
        )
        record(
            args.out,
            {"setting": "full", "size": len(train), **run_finetune(args, train, heldout, args.steps)},
        )
    if args.only in (None, "low"):
        methods = args.methods.split(",")
        for seed in (int(s) for s in args.seeds.split(",")):
            shuffled = list(train)
            random.Random(seed).shuffle(shuffled)
            for size in (int(s) for s in args.sizes.split(",")):
                subset, steps = shuffled[:size], args.low_data_steps
                row = {"setting": "low", "size": size, "seed": seed, "steps": steps}
                if "prefix" in methods:
                    record(
                        args.out, {**row, **run_prefix(args, subset, heldout, steps, "table-to-text:", seed)}
                    )
                if "finetune" in methods:
                    record(args.out, {**row, **run_finetune(args, subset, heldout, steps, seed)})


if __name__ == "__main__":
    main()
