"""Throughput when many distinct prefixes rotate through a small device cache, vs all of them resident.

    .venv/bin/python -m bench.cache_rotation                  # 1,000 prefixes, cache holds 100, Redis store

Both cases use the same prefix-serve process settings but the cache budget: room for every prefix, or room
for --resident prefixes, so that almost every request misses and loads its prefix from the store (Redis by
default) into the device cache. Both servers run at once and are warmed up the same way (one pass over every
prefix, 1 token each: it leaves everything resident in the first, the last --resident prefixes in the second);
then the timed runs alternate between them, --repeats each; the figures are the median and the range. Results go to
bench/results/cache_rotation.json (python -m bench.report renders them into bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch

from bench.record import spread, write_result
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


def cache_counters(url: str) -> dict[str, float]:
    counters = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("prefixserve_prefix_cache_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            counters[name.removeprefix("prefixserve_prefix_cache_")] = float(value)
    return counters


def measure(model_dir: Path, store_url: str, budgets: dict[str, int], jobs, args, workdir: Path) -> dict:
    """One server per cache budget, all up at once and warmed the same way; the timed runs alternate between
    them (run 1 of each case, then run 2 of each, ...) so that a change in the machine's load over time
    weighs on every case alike."""
    from serving import running_server

    with ExitStack() as stack:
        servers = {}
        for case, cache_bytes in budgets.items():
            server_args = ["--cache-bytes", str(cache_bytes), "--max-num-seqs", str(args.concurrency)]
            server_args += ["--log-level", "warning"]
            servers[case] = stack.enter_context(
                running_server(model_dir, store_url, workdir / case, args=server_args)
            )
        warm = [(i, "warm") for i in range(args.prefixes)]
        for server in servers.values():
            asyncio.run(drive(server.url, warm, 1, args.concurrency))
        rates: dict[str, list[float]] = {case: [] for case in servers}
        counters: dict[str, list[dict[str, float]]] = {case: [] for case in servers}
        for _ in range(args.repeats):
            for case, server in servers.items():
                before = cache_counters(server.url)
                elapsed = asyncio.run(drive(server.url, jobs, args.new_tokens, args.concurrency))
                rates[case].append(len(jobs) * args.new_tokens / elapsed)
                after = cache_counters(server.url)
                counters[case].append({k: after[k] - before.get(k, 0.0) for k in after})
    return {case: {"tokens_per_s": spread(rates[case]), "cache_per_run": counters[case]} for case in servers}


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case")
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
        budgets = {"all_resident": prefix_bytes * args.prefixes * 2, "rotating": prefix_bytes * args.resident}
        cases = measure(model_dir, args.store, budgets, jobs, args, workdir)
        resident, rotating = cases["all_resident"], cases["rotating"]
    finally:  # Redis keeps everything in memory: leave nothing behind
        store = open_store(args.store)
        for i in range(args.prefixes):
            store.delete(f"rot/p{i:04d}")
        store.close()
    ratio = rotating["tokens_per_s"]["median"] / resident["tokens_per_s"]["median"]
    print(
        f"\n{args.prefixes} prefixes of {prefix_bytes / 1024:.0f} KiB (P={args.virtual_tokens}) in {args.store.split('?')[0]}, "
        f"{args.requests} requests x {args.new_tokens} tokens, concurrency {args.concurrency}, {args.repeats} runs"
    )
    for label, case in (("all resident", resident), (f"cache holds {args.resident}", rotating)):
        rate = case["tokens_per_s"]
        last = case["cache_per_run"][-1]
        print(
            f"  {label:<20} {rate['median']:10.1f} tokens/s (range {rate['min']:.1f}-{rate['max']:.1f})   "
            f"last run: {last.get('hits_total', 0):.0f} hits, {last.get('misses_total', 0):.0f} misses, "
            f"{last.get('evictions_total', 0):.0f} evictions"
        )
    print(f"  rotating / all resident   {ratio:10.3f} (medians)")
    figures = {
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads},
        "store": args.store.split("?")[0],
        "prefixes": args.prefixes,
        "prefix_bytes": prefix_bytes,
        "virtual_tokens": args.virtual_tokens,
        "resident_capacity": args.resident,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "concurrency": args.concurrency,
        "all_resident": resident,
        "rotating": rotating,
        "ratio_rotating_vs_resident": ratio,
    }
    write_result("cache_rotation", "bench.cache_rotation", figures)


if __name__ == "__main__":
    main()
