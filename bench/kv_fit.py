"""How many sequences of --max-model-len positions fit next to a GPT-2-large/xl-shaped model at the default KV
budget: the real `prefix-serve` started on the device, its start-up lines about the KV cache, and the device
memory it holds once ready.

    python -m bench.kv_fit --device cuda                 # gpt2-large float32, gpt2-xl bfloat16
    .venv/bin/python -m bench.kv_fit --shapes 2x64x2 --device cpu --dtype float32   # CPU, a look

Each model is built here with random weights (nothing downloaded) in the dtype it is served in; the server
runs with its defaults except --dtype (and --max-num-seqs, raised so the cap shows what the budget holds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"large": (36, 1280, 20), "xl": (48, 1600, 25)}


def build(path: Path, layers: int, width: int, heads: int, dtype: str, device: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.throughput import build_backbone

    build_backbone(path, 1, 32, 1, 50257)  # the tokenizer (and a throwaway model, overwritten below)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def device_memory_used() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"


def main() -> None:
    import serving

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--shapes",
        default="large:float32,xl:bfloat16",
        help="NAME:DTYPE (large, xl) or LAYERSxWIDTHxHEADS, comma-separated",
    )
    parser.add_argument("--dtype", help="one dtype for every shape")
    parser.add_argument("--max-num-seqs", type=int, default=4096)
    args = parser.parse_args()
    serving.DEVICE = args.device
    for item in args.shapes.split(","):
        name, _, dtype = item.partition(":")
        dtype = args.dtype or dtype or "float32"
        layers, width, heads = SHAPES.get(name) or tuple(int(x) for x in name.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            model = build(Path(tmp) / "model", layers, width, heads, dtype, args.device)
            extra = ["--dtype", dtype, "--max-num-seqs", str(args.max_num_seqs)]
            with serving.running_server(model, str(Path(tmp) / "store"), Path(tmp), args=extra) as server:
                lines = [line for line in server.log().splitlines() if "KV cache" in line]
                used = device_memory_used()
            print(
                f"\nGPT-2 {layers}x{width} ({name}), {dtype} on {args.device}; device memory in use: {used}"
            )
            for line in lines:
                print("  " + line[line.index("KV cache") :])


if __name__ == "__main__":
    main()
