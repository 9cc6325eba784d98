"""`prefix-train` (also `python -m trainer`): train a prefix on a frozen GPT-2, BART or Llama-family model,
evaluate BLEU, export a native prefix file, optionally upload it to a running prefix-serve.

    prefix-train --model models/demo-gpt2 --train ../shared/data/e2e/valid.txt --output e2e.safetensors \\
        --dev held-out.jsonl --upload http://127.0.0.1:8000/demo/e2e
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

from prefix_store.format import save_prefix
from trainer.backbone import load_backbone
from trainer.data import Example, read_examples
from trainer.evaluate import evaluate
from trainer.train import TrainConfig, train_prefix

log = logging.getLogger("prefix-train")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# --lr auto: a CPU run affords a few hundred optimizer steps, which need a much higher rate than the paper's
# (tuned for thousands of GPU steps); the CPU value was calibrated on the demo backbone (docs/demo.md).
AUTO_LR = {"cpu": 5e-3, "cuda": 8e-5}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks; show every option's default (help texts of options whose default
    is None say what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)".strip()


class CliError(Exception):
    """A problem with the inputs or the upload target: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix-train", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="local HF directory: GPT-2, BART or Llama family (Llama, Qwen2, Mistral) (required)",
    )
    p.add_argument(
        "--train",
        required=True,
        type=Path,
        help="training data (required): *.jsonl {source,target}, a source||target text file, or WebNLG XML (file/dir)",
    )
    p.add_argument(
        "--output", required=True, type=Path, help="native prefix file to write (.safetensors) (required)"
    )
    p.add_argument(
        "--max-train-examples", type=int, help="use only the first N training examples (default: all)"
    )
    p.add_argument("--prefix-length", type=int, default=5, help="number of virtual tokens P (paper, E2E: 5)")
    p.add_argument("--mid-dim", type=int, default=512, help="hidden size of the reparameterisation MLP")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 5e-3 on CPU, 8e-5 -- the paper's -- on CUDA; see docs/demo.md)")  # fmt: skip
    p.add_argument("--epochs", type=float, default=5.0, help="passes over the training data")
    p.add_argument(
        "--max-steps", type=int, help="optimizer steps (overrides --epochs; default: from --epochs)"
    )
    p.add_argument("--batch-size", type=int, default=10, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then linear decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--template",
        help="prompt template with {source} (default: the backbone's: GPT-2 ' {source} <|endoftext|>', BART '{source}')",
    )
    p.add_argument(
        "--init-text", help="initialise the prefix from the activations of this real text (default: random)"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint file (default: OUTPUT + .checkpoint.pt, next to the output)")  # fmt: skip
    p.add_argument("--save-every", type=int, default=200, help="optimizer steps between checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint if it exists (default: start afresh)",
    )
    p.add_argument(
        "--dev",
        type=Path,
        help="evaluation data (same formats as --train): corpus BLEU, all references (default: no evaluation)",
    )
    p.add_argument(
        "--eval-max-sources", type=int, help="evaluate on the first N distinct sources only (default: all)"
    )
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (as the server); the paper uses 5")
    p.add_argument("--max-new-tokens", type=int, default=100, help="evaluation: tokens per output at most")
    p.add_argument(
        "--export-dtype", default="float32", choices=sorted(DTYPES), help="dtype of the prefix file"
    )
    p.add_argument("--upload", help="URL/TENANT/NAME of a running prefix-serve, e.g. http://127.0.0.1:8000/demo/e2e "
                                    "(bearer key from PREFIXSERVE_API_KEY; server and key are checked before training; default: no upload)")  # fmt: skip
    p.add_argument(
        "--public", action="store_true", help="with --upload: make it public (needs the admin key)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars (a log line every 50 steps instead)"
    )
    return p


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("prefix-train: --device cuda but no CUDA device is available")
    return name


def _upload_target(url_with_id: str) -> tuple[str, str, str, dict[str, str]]:
    """(base URL, tenant, name, auth headers) from `http://HOST:PORT[/base]/TENANT/NAME`."""
    parts = urlsplit(url_with_id)
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme not in ("http", "https") or not parts.netloc or len(segments) < 2:
        raise CliError(f"--upload {url_with_id!r} must look like http://HOST:PORT/TENANT/NAME")
    tenant, name = segments[-2:]
    base = f"{parts.scheme}://{parts.netloc}/" + "/".join(segments[:-2])
    headers = {}
    if key := os.environ.get("PREFIXSERVE_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    return base.rstrip("/"), tenant, name, headers


def check_upload_target(url_with_id: str) -> None:
    """Before training: the server answers and the key may manage the tenant (a one-line CliError if not)."""
    base, tenant, _, headers = _upload_target(url_with_id)
    try:
        response = httpx.get(f"{base}/v1/prefixes", params={"tenant": tenant, "limit": 1}, headers=headers,
                             timeout=10)  # fmt: skip
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the upload server {base}: {exc}") from None
    if response.status_code == 401:
        raise CliError(f"{base} refused the key (HTTP 401): set PREFIXSERVE_API_KEY to a key of tenant {tenant!r} "
                         "or the admin key")  # fmt: skip
    if response.status_code in (403, 404):
        raise CliError(f"the key in PREFIXSERVE_API_KEY may not upload under tenant {tenant!r} "
                         f"(HTTP {response.status_code} from {base})")  # fmt: skip
    if response.status_code != 200:
        raise CliError(f"{base} does not look like prefix-serve: GET /v1/prefixes answered HTTP "
                         f"{response.status_code}")  # fmt: skip


def upload(url_with_id: str, data: bytes, public: bool = False) -> dict:
    """PUT the native file to `{base}/v1/prefixes/{tenant}/{name}`; url_with_id = base URL + /tenant/name."""
    base, tenant, name, headers = _upload_target(url_with_id)
    headers["Content-Type"] = "application/octet-stream"
    try:
        response = httpx.put(f"{base}/v1/prefixes/{tenant}/{name}", content=data, headers=headers,
                             params={"public": "true"} if public else None, timeout=60)  # fmt: skip
    except httpx.HTTPError as exc:
        raise CliError(f"upload to {base} failed: {exc}") from None
    if response.status_code not in (200, 201):
        raise CliError(f"upload failed: HTTP {response.status_code}: {response.text}")
    return response.json()


def _read(flag: str, path: Path) -> list[Example]:
    if not path.exists():
        raise CliError(f"{flag} {path}: no such file or directory")
    try:
        examples = read_examples(path)
    except (ValueError, OSError, ET.ParseError) as exc:
        raise CliError(f"{flag} {path}: {exc}") from None
    if not examples:
        raise CliError(f"{flag} {path}: no examples in it")
    return examples


def preflight(args: argparse.Namespace) -> tuple[list[Example], list[Example] | None]:
    """Everything that can be checked before the model is loaded and training starts."""
    if not (args.model / "config.json").is_file():
        raise CliError(f"--model {args.model}: not a local model directory (no config.json)")
    examples = _read("--train", args.train)[: args.max_train_examples]
    dev = _read("--dev", args.dev) if args.dev else None
    if args.output.exists() and args.output.is_dir():
        raise CliError(f"--output {args.output} is a directory; give a file name such as e2e.safetensors")
    if args.public and not args.upload:
        raise CliError("--public needs --upload")
    if args.upload:
        check_upload_target(args.upload)
    return examples, dev


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return run(args)
    except CliError as exc:
        print(f"prefix-train: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    examples, dev = preflight(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.lr is None:
        args.lr = AUTO_LR[device]
        log.info("learning rate %g (the default on %s; set --lr to change it)", args.lr, device)
    backbone = load_backbone(args.model, device)
    checkpoint = args.checkpoint or args.output.with_name(args.output.name + ".checkpoint.pt")
    if args.resume and not checkpoint.exists():
        log.warning("--resume: no checkpoint at %s yet, starting from scratch", checkpoint)
    log.info("checkpoints go to %s (every %d steps and at the end; --resume continues from it)",
             checkpoint, args.save_every)  # fmt: skip
    config = TrainConfig(
        num_virtual_tokens=args.prefix_length, mid_dim=args.mid_dim, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed, save_every=args.save_every,
        init_text=args.init_text, template=args.template, show_progress=not args.quiet,
    )  # fmt: skip
    result = train_prefix(backbone, examples, config, checkpoint=checkpoint, resume=args.resume)
    metadata = {"x-trainer": "prefix-train", "x-base-model": backbone.name(), "x-train-steps": str(result.steps),
                "x-train-loss": f"{result.last_loss:.4f}"}  # fmt: skip
    if dev:
        evaluation = evaluate(backbone, result.tuner(), dev, result.template,
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
        try:
            meta = upload(args.upload, data, args.public)
        except CliError as exc:
            raise CliError(f"{exc} (the prefix is saved at {args.output})") from None
        log.info("uploaded as %s", meta.get("id", args.upload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
