"""What --stream-interval buys: two servers side by side, one sending each token's event at once (interval 1),
one grouping a stream's events N to a write, the same rounds alternating between them.

    .venv/bin/python -m bench.stream_interval                       # GPT-2 4x256, 64 requests x 128 tokens, N=4
    .venv/bin/python -m bench.stream_interval --layers 1 --width 64 --heads 1 --requests 128 --new-tokens 256
    python -m bench.stream_interval --device cuda                  # on a GPU (servers in float32)

Each round is bench.sampling's load (64 concurrent requests, 8 prefixes round-robin, EOS ignored): greedy,
sampled (temperature 0.8, top-k 50, top-p 0.95, a seed each), and the sampled load streamed. The servers run
from this checkout with the same backbone (random weights, nothing downloaded); the rounds alternate between
them --rounds times, so drifts of a shared machine fall on both. Prints per round and the median: tokens/s,
streamed ÷ greedy and streamed ÷ sampled, and the CPU seconds each server process spent. A benchmark, not a
test; nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
from pathlib import Path

from bench.sampling import add_load_args, bodies_for, cpu_seconds, round_trip, start_server
from bench.throughput import build_backbone, workload

MODES = ("greedy", "sampled", "sampled+streamed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_args(parser)
    parser.add_argument("--interval", type=int, default=4, help="the grouping server's --stream-interval")
    parser.add_argument("--rounds", type=int, default=5, help="alternations (each runs every mode on both)")
    args = parser.parse_args()

    intervals = (1, args.interval)
    jobs = workload(args.requests, args.prefixes)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        model_dir = build_backbone(root / "model", args.layers, args.width, args.heads, args.vocab)
        servers = {n: start_server(stack, model_dir, root / f"interval-{n}", args, n) for n in intervals}
        rates: dict[tuple[int, str], list[float]] = {}
        cpu: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.rounds):
            for n, server in servers.items():
                for mode in MODES:
                    before = cpu_seconds(server.process.pid)
                    seconds, tokens = asyncio.run(
                        round_trip(server.url, bodies_for(mode, jobs, args.new_tokens))
                    )
                    if tokens != args.requests * args.new_tokens:
                        raise RuntimeError(f"{mode}: {tokens} tokens came back")
                    rates.setdefault((n, mode), []).append(tokens / seconds)
                    cpu.setdefault((n, mode), []).append(cpu_seconds(server.process.pid) - before)

    print(f"{args.requests} requests x {args.new_tokens} tokens, {args.prefixes} prefixes, GPT-2 "
          f"{args.layers}x{args.width} on {args.device}; {args.rounds} alternating rounds; medians (per round)")  # fmt: skip
    for n in intervals:
        for mode in MODES:
            r = rates[(n, mode)]
            print(f"--stream-interval {n:<3} {mode:<17} {statistics.median(r):7.0f} tokens/s  "
                  f"server cpu {statistics.median(cpu[(n, mode)]):5.2f} s  ({', '.join(f'{x:.0f}' for x in r)})")  # fmt: skip
        for over in ("greedy", "sampled"):
            ratios = [s / o for s, o in zip(rates[(n, "sampled+streamed")], rates[(n, over)], strict=True)]
            print(f"--stream-interval {n:<3} streamed / {over:<8} {statistics.median(ratios):.2f}  "
                  f"({', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
