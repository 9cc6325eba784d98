"""`prefix-train` (also `python -m trainer`): train a prefix on a frozen GPT-2 / BART, evaluate BLEU, export a
native prefix file, optionally upload it to a running prefix-serve.

    prefix-train --model models/demo-gpt2 --train ../shared/data/e2e/valid.txt --output e2e.safetensors \\
        --dev held-out.jsonl --upload http://127.0.0.1:8000/demo/e2e
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

from prefix_store.format import save_prefix
from trainer.backbone import load_backbone
from trainer.data import read_examples
from trainer.evaluate import evaluate
from trainer.train import TrainConfig, train_prefix

log = logging.getLogger("prefix-train")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, type=Path, help="local HF directory: GPT-2 or BART family")
    p.add_argument(
        "--train",
        required=True,
        type=Path,
        help="training data: *.jsonl {source,target}, a source||target text file, or WebNLG XML (file/dir)",
    )
    p.add_argument("--output", required=True, type=Path, help="native prefix file to write (.safetensors)")
    p.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    p.add_argument("--prefix-length", type=int, default=5, help="number of virtual tokens P (paper, E2E: 5)")
    p.add_argument("--mid-dim", type=int, default=512, help="hidden size of the reparameterisation MLP")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", help="prompt template with {source} (default: the backbone's, see docs)")
    p.add_argument("--init-text", help="initialise the prefix from the activations of this real text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: OUTPUT + .checkpoint.pt)")
    p.add_argument("--save-every", type=int, default=200, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    p.add_argument(
        "--dev", type=Path, help="evaluation data (same formats as --train): corpus BLEU, all references"
    )
    p.add_argument("--eval-max-sources", type=int, help="evaluate on the first N distinct sources only")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (as the server); the paper uses 5")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--export-dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--upload", help="URL/TENANT/NAME of a running prefix-serve, e.g. http://127.0.0.1:8000/demo/e2e "
                                    "(bearer key from PREFIXSERVE_API_KEY)")  # fmt: skip
    p.add_argument(
        "--public", action="store_true", help="with --upload: make it public (needs the admin key)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("prefix-train: --device cuda but no CUDA device is available")
    return name


def upload(url_with_id: str, data: bytes, public: bool = False) -> dict:
    """PUT the native file to `{base}/v1/prefixes/{tenant}/{name}`; url_with_id = base URL + /tenant/name."""
    parts = urlsplit(url_with_id)
    segments = [s for s in parts.path.split("/") if s]
    if not parts.scheme or len(segments) < 2:
        raise ValueError("--upload must look like http://HOST:PORT/TENANT/NAME")
    tenant, name = segments[-2:]
    base = f"{parts.scheme}://{parts.netloc}/" + "/".join(segments[:-2])
    headers = {"Content-Type": "application/octet-stream"}
    if key := os.environ.get("PREFIXSERVE_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.put(f"{base.rstrip('/')}/v1/prefixes/{tenant}/{name}", content=data, headers=headers,
                         params={"public": "true"} if public else None, timeout=60)  # fmt: skip
    if response.status_code not in (200, 201):
        raise RuntimeError(f"upload failed: HTTP {response.status_code}: {response.text}")
    return response.json()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, resolve_device(args.device))
    examples = read_examples(args.train)[: args.max_train_examples]
    config = TrainConfig(
        num_virtual_tokens=args.prefix_length, mid_dim=args.mid_dim, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed, save_every=args.save_every,
        init_text=args.init_text, template=args.template, show_progress=not args.quiet,
    )  # fmt: skip
    checkpoint = args.checkpoint or args.output.with_name(args.output.name + ".checkpoint.pt")
    result = train_prefix(backbone, examples, config, checkpoint=checkpoint, resume=args.resume)
    metadata = {"x-trainer": "prefix-train", "x-base-model": backbone.name(), "x-train-steps": str(result.steps),
                "x-train-loss": f"{result.last_loss:.4f}"}  # fmt: skip
    if args.dev:
        evaluation = evaluate(backbone, result.tuner(), read_examples(args.dev), result.template,
                              args.eval_max_sources, args.num_beams, args.max_new_tokens, not args.quiet)  # fmt: skip
        log.info(
            "dev %s (%s)", evaluation.summary(), "greedy" if args.num_beams == 1 else f"beam {args.num_beams}"
        )
        metadata["x-dev-bleu"] = f"{evaluation.bleu:.2f}"
    prefix = result.tuner.export(DTYPES[args.export_dtype], result.template, metadata)
    data = save_prefix(prefix)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    log.info("wrote %s (%d bytes, P=%d, targets %s)", args.output, len(data), prefix.num_virtual_tokens,
             ",".join(prefix.target_names()))  # fmt: skip
    if args.upload:
        meta = upload(args.upload, data, args.public)
        log.info("uploaded as %s", meta.get("id", args.upload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
