"""Held-out perplexity and copy probes of a demo backbone, on the held-out blocks of the current corpus recipe
(scripts/train_demo_backbone.py --group-by-source, seed 0), so that backbones are compared on the same text.

    .venv/bin/python scripts/backbone_report.py models/demo-gpt2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.copy_probes import run_probes  # noqa: E402
from scripts.train_demo_backbone import DATA, corpus, heldout_loss, pack  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    docs, _ = corpus(DATA, group_by_source=True, rename_frac=0.5, seed=0)
    for model_dir in args.models:
        tokenizer = GPT2Tokenizer.from_pretrained(model_dir)
        model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
        blocks = pack(tokenizer, docs, model.config.n_positions, seed=0)
        heldout = blocks[: max(8, len(blocks) // 50)]
        loss = heldout_loss(model, heldout)
        row = {"model": str(model_dir), "heldout_tokens": heldout.numel(), "heldout_loss": round(loss, 4),
               "perplexity": round(math.exp(loss), 1), **run_probes(model, tokenizer, " ".join(docs))}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
