"""Throughput when many distinct prefixes rotate through a small device cache, vs all of them resident.

    .venv/bin/python -m bench.cache_rotation                  # 1,000 prefixes, cache holds 100, Redis store

Both runs use the same prefix-serve process settings but the cache budget: first with room for every
prefix (after a warm-up pass that makes them all resident), then with room for --resident prefixes, so
almost every request misses and loads its prefix from the store (Redis by default) into the device cache.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.throughput import ROOT, build_backbone, workload
from prefix_store.format import Prefix, save_prefix
from prefix_store.store import make_meta, open_store

sys.path.insert(0, str(ROOT / "tests"))


def fill_store(url: str, num_prefixes: int, shape: tuple[int, int, int], num_tokens: int) -> int:
    layers, heads, head_dim = shape
    store = open_store(url)
    generator = torch.Generator().manual_seed(0)
    size = 0
    for i in range(num_prefixes):
        prefix = Prefix(
            "gpt2", {"decoder": torch.randn(layers, 2, heads, num_tokens, head_dim, generator=generator)}
        )
        data = save_prefix(prefix)
        store.put(make_meta(f"rot/p{i:04d}", prefix, data, "native", False), data)
        size = prefix.num_bytes
    store.close()
    return size


async def drive(url: str, jobs: list[tuple[int, str]], new_tokens: int, concurrency: int) -> float:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(prefix_index: int, prompt: str) -> None:
            async with limit:
                body = {
                    "prefix": f"rot/p{prefix_index:04d}",
                    "prompt": prompt,
                    "max_new_tokens": new_tokens,
                    "ignore_eos": True,
                }
                (await client.post("/v1/generate", json=body)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one(*job) for job in jobs))
        return time.perf_counter() - start


def measure(
    model_dir: Path, store_url: str, cache_bytes: int, jobs, args, workdir: Path, warm: bool
) -> tuple[float, str]:
    from serving import running_server

    server_args = [
        "--cache-bytes",
        str(cache_bytes),
        "--max-num-seqs",
        str(args.concurrency),
        "--log-level",
        "warning",
    ]
    with running_server(model_dir, store_url, workdir, args=server_args) as server:
        if warm:
            asyncio.run(drive(server.url, [(i, "warm") for i in range(args.prefixes)], 1, args.concurrency))
        elapsed = asyncio.run(drive(server.url, jobs, args.new_tokens, args.concurrency))
        metrics = httpx.get(f"{server.url}/metrics").text
    cache_lines = [line for line in metrics.splitlines() if line.startswith("prefixserve_prefix_cache_")]
    return len(jobs) * args.new_tokens / elapsed, "; ".join(cache_lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="redis://127.0.0.1:6379/14?namespace=bench-rotation")
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--resident", type=int, default=100)
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="prefixserve-rotation-"))
    model_dir = build_backbone(workdir / "model", args.layers, args.width, args.heads, 8000)
    prefix_bytes = fill_store(
        args.store, args.prefixes, (args.layers, args.heads, args.width // args.heads), args.virtual_tokens
    )
    prompts = [prompt for _, prompt in workload(args.requests, 1)]
    # consecutive requests use different prefixes: a cache of `resident` prefixes misses almost every time
    jobs = [((i * 7919) % args.prefixes, prompts[i]) for i in range(args.requests)]
    try:
        everything = prefix_bytes * args.prefixes * 2
        all_resident, all_lines = measure(model_dir, args.store, everything, jobs, args, workdir, True)
        small = prefix_bytes * args.resident
        rotating, rot_lines = measure(model_dir, args.store, small, jobs, args, workdir, False)
    finally:  # Redis keeps everything in memory: leave nothing behind
        store = open_store(args.store)
        for i in range(args.prefixes):
            store.delete(f"rot/p{i:04d}")
        store.close()
    print(
        f"\n{args.prefixes} prefixes of {prefix_bytes / 1024:.0f} KiB (P={args.virtual_tokens}) in {args.store.split('?')[0]}, "
        f"{args.requests} requests x {args.new_tokens} tokens, concurrency {args.concurrency}"
    )
    print(f"  all resident               {all_resident:10.1f} tokens/s   [{all_lines}]")
    print(f"  cache holds {args.resident:<5}          {rotating:10.1f} tokens/s   [{rot_lines}]")
    print(f"  rotating / all resident    {rotating / all_resident:10.3f}")


if __name__ == "__main__":
    main()
