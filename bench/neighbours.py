"""A decode step's forward beside other work on the same machine: why this CPU's figures move from day to day.

    .venv/bin/python -m bench.neighbours                # GPT-2 4x256, 64 rows, 160 keys: bench.sampling's decode
    .venv/bin/python -m bench.neighbours --rows 8 --length 64 --repeats 2 --no-record

The engine's own forward for one decode step (`GPT2Backbone.decode` over a slot KV cache, one thread, as the
benchmarks' servers run it), timed alone and beside one neighbour process at a time: "compute" (pure-Python
arithmetic: a core busy, almost no memory traffic) and "memory" (a 64 MiB tensor copied over and over: the
memory bus busy). The rounds alternate (alone, compute, memory) --repeats times, so a drift of the machine falls
on every kind alike; medians of the rounds, and each kind's ratio to alone. Beside it, what bounds the step: one
layer's decode attention (`scaled_dot_product_attention` over the K/V entries it reads) as bytes read per
second, against a plain tensor copy's rate on this machine. Where the two are close, the decode attention is
bound by memory bandwidth, and whatever else reads memory on the machine (a neighbour process, the server's own
HTTP front and the client on the other core, another guest of the host) slows the step.

The backbone is built here with random weights (bench.throughput's recipe); nothing is downloaded. Writes
bench/results/neighbours.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.record import spread, write_result
from bench.throughput import add_backbone_args, build_backbone

NEIGHBOURS = {
    "compute": "x = 0\nwhile True:\n    for i in range(10_000):\n        x ^= i * i\n",
    "memory": (
        "import torch\ntorch.set_num_threads(1)\na = torch.ones(16 << 20)\nb = torch.empty_like(a)\n"
        "while True:\n    b.copy_(a)\n"
    ),
}
KINDS = ("alone", *NEIGHBOURS)


def median_ms(fn, steps: int) -> float:
    """Median wall time of `fn()` over `steps` calls, in ms (after one call to warm up)."""
    fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def decode_step(model_dir: Path, rows: int, length: int):
    """() -> one decode step of `rows` slots over `length` cache entries each (random K/V), and the backbone."""
    from server.engine.backbone import load_backbone
    from server.engine.kv_cache import KVCache

    backbone = load_backbone(str(model_dir), "cpu", "float32")
    cache = KVCache(backbone.shape, rows, max(length, 1024), 0, backbone.device, backbone.dtype)
    g = torch.Generator().manual_seed(0)
    cache.self_kv.normal_(generator=g)
    vocab = backbone.lm_head.out_features
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    positions = torch.full((rows,), length - 1)
    return (lambda: backbone.decode(cache, tokens, positions, length)), backbone, cache


def attention_rate(backbone, cache, rows: int, length: int, steps: int) -> tuple[float, float]:
    """(ms, GB/s): one layer's decode attention over `length` entries of `rows` slots, as the forward calls it
    (bytes = the K and V entries it reads)."""
    shape = backbone.shape
    q = torch.randn(rows, shape.num_heads, 1, shape.head_dim)
    kv = cache.self_kv[0]
    k, v = kv[0, :rows, :, :length], kv[1, :rows, :, :length]
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), steps)
    return ms, 2 * k.numel() * k.element_size() / (ms * 1e-3) / 1e9


def copy_rate(steps: int) -> float:
    """GB/s of a plain copy of a 64 MiB tensor (read + write counted once each)."""
    a = torch.ones(16 << 20)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), steps)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def beside(kind: str, fn, steps: int) -> float:
    """Median forward ms with the neighbour `kind` running in a process of its own (none for "alone")."""
    if kind == "alone":
        return median_ms(fn, steps)
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[kind]], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # started and at its work
        return median_ms(fn, steps)
    finally:
        neighbour.kill()
        neighbour.wait()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        step, backbone, cache = decode_step(model_dir, args.rows, args.length)
        with torch.inference_mode():
            rounds: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(args.repeats):
                for kind in KINDS:
                    rounds[kind].append(beside(kind, step, args.steps))
            attention_ms, attention_gbs = attention_rate(backbone, cache, args.rows, args.length, args.steps)
        copy_gbs = copy_rate(args.steps)
    forward = {kind: spread(ms) for kind, ms in rounds.items()}
    for figures in forward.values():
        figures["x_alone"] = figures["median"] / forward["alone"]["median"]
    return {
        "forward_ms": forward,
        "attention": {
            "ms_per_layer": attention_ms,
            "read_gb_per_s": attention_gbs,
            "layers_ms": attention_ms * args.layers,
        },
        "copy_gb_per_s": copy_gbs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backbone_args(parser)
    parser.add_argument("--rows", type=int, default=64, help="sequences in the decode step")
    parser.add_argument("--length", type=int, default=160, help="cache entries each row attends to")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each kind (alternating)")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results/neighbours.json")
    args = parser.parse_args()
    figures = run(args)
    print(f"decode step: GPT-2 {args.layers}x{args.width}, {args.rows} rows x {args.length} keys, one thread")
    print(f"{'beside':<10} {'forward ms (median)':>20} {'min-max':>14} {'x alone':>8}")
    for kind, f in figures["forward_ms"].items():
        print(f"{kind:<10} {f['median']:>20.2f} {f['min']:>6.2f}-{f['max']:<7.2f} {f['x_alone']:>8.2f}")
    a = figures["attention"]
    print(f"decode attention: {a['ms_per_layer']:.2f} ms a layer ({a['layers_ms']:.2f} ms for {args.layers}), "
          f"reading K/V at {a['read_gb_per_s']:.1f} GB/s; a plain copy: {figures['copy_gb_per_s']:.1f} GB/s")  # fmt: skip
    if not args.no_record:
        settings = {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "rows", "length", "steps",
                                                  "repeats")}  # fmt: skip
        write_result("neighbours", "bench.neighbours", {"settings": settings, **figures})


if __name__ == "__main__":
    main()
