"""What a decode step's attention pays for reading a slot cache in place, on the CPU.

    .venv/bin/python -m bench.decode_attention

The slot cache (server/engine/kv_cache.py) keeps each sequence's keys and values at full length,
[slots, heads, max_positions, head_dim], and a decode step hands SDPA a view of the first `length` entries of
every slot: each (slot, head) block is contiguous, the blocks lie max_positions apart. Here the same SDPA call
(one query per row, a boolean mask, one thread) reads the same keys and values from slot caches of several
max_positions and from one contiguous tensor (HF's DynamicCache layout, what torch.cat leaves), --copies of each
cycled so that every call reads from memory rather than the last call's cache lines, at two shapes (SHAPES:
bench.host_path's tiny GPT-2, whose blocks are small, and GPT-2 small's heads). Per layout, the best of
--repeats rounds of this process's CPU per call. Writes bench/results/decode_attention.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.record import write_result


def cpu_ms_per_call(q, views, mask, rounds: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(rounds):
            for keys, values in views:
                F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        best = min(best, (time.process_time() - started) / rounds / len(views) * 1e3)
    return best


SHAPES = [  # (rows, heads, head_dim, keys a step reads): bench.host_path's tiny GPT-2, then GPT-2 small's heads
    (256, 2, 32, 150),
    (64, 12, 64, 300),
]


def layouts_of(
    rows: int, heads: int, head_dim: int, length: int, args: argparse.Namespace
) -> dict[str, float]:
    q = torch.randn(rows, heads, 1, head_dim)
    positions = torch.randint(length // 2, length, (rows,))
    mask = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None, :]
    layouts: dict[str, float] = {}
    for max_positions in (None, 256, 1024, 2048):  # None: contiguous [rows, heads, length, head_dim]
        if max_positions is not None and max_positions < length:
            continue
        size = length if max_positions is None else max_positions
        caches = [torch.randn(2, rows, heads, size, head_dim) for _ in range(args.copies)]
        views = [(c[0, :, :, :length], c[1, :, :, :length]) for c in caches]
        name = "contiguous" if max_positions is None else f"slot cache, max_positions {max_positions}"
        layouts[name] = cpu_ms_per_call(q, views, mask, args.rounds, args.repeats)
        print(
            f"rows {rows} x {heads} heads x {head_dim}, {length} keys, {name:>32}: {layouts[name]:.3f} ms a call "
            f"({layouts[name] / layouts['contiguous']:.2f}x contiguous)"
        )
        del caches, views
    return layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = []
    for rows, heads, head_dim, length in SHAPES:
        layouts = layouts_of(rows, heads, head_dim, length, args)
        shapes.append({
            "rows": rows, "heads": heads, "head_dim": head_dim, "length": length,
            "cpu_ms_per_call": layouts,
            "x_contiguous": {name: ms / layouts["contiguous"] for name, ms in layouts.items()},
        })  # fmt: skip
    write_result("decode_attention", "bench.decode_attention", {"shapes": shapes})


if __name__ == "__main__":
    main()
