"""KV capacity: the slot cache beside the paged pool (`--kv-layout paged`) at one fixed KV budget.

    .venv/bin/python -m bench.kv_capacity --write                 # GPT-2, 4 layers, width 256, CPU (minutes)
    .venv/bin/python -m bench.kv_capacity --layers 24 --width 1024 --heads 16 --requests 512 --device cuda

The issue's mix, scaled to a 2-core CPU by --requests: prompts and outputs of 20-300 tokens each (random ids,
outputs ignore EOS), --max-model-len 1024, 32 tenants whose prefixes are 16-128 tokens, requests round-robin over
the tenants (so each prefix is used by many requests). The budget is --budget-seqs full-length slots' bytes. Three
runs, in one process, of the same requests (--repeats times each, interleaved; tokens/s as median and range):

- `slots`: today's cache; the budget caps the running batch at --budget-seqs sequences.
- `paged`: the pool of the same bytes; a request takes blocks as it grows (preempted and resumed when they run
  out: the run reports how often), its prefix's
  blocks are shared; the running batch is what the blocks admit (rows capped at --max-num-seqs).
- `paged_same_rows`: the paged layout capped at the slot cache's running batch (--budget-seqs rows), so its
  tokens/s beside `slots` is the cost of reading through block tables at equal concurrency.

In-process (the engine's front, no HTTP). Reported per run: the most and the mean sequences a decode step ran,
tokens/s, wall seconds; for the paged runs the pool's peak blocks held by prefixes and by sequences; and what a
4-beam group of a 128-token prefix and 200-token prompt reserves in each layout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.throughput import add_backbone_args, build_backbone


def tenant_prefixes(backbone, num_tenants: int, rng: random.Random) -> list:
    """One random prefix of 16-128 tokens per tenant, as the engine holds a resident one."""
    from prefix_store.cache import DevicePrefix
    from prefix_store.format import Prefix, save_prefix
    from prefix_store.store import make_meta

    shape = backbone.shape
    out = []
    for i in range(num_tenants):
        length = rng.randint(16, 128)
        generator = torch.Generator().manual_seed(i)
        decoder = torch.randn(
            shape.num_layers, 2, shape.num_heads, length, shape.head_dim, generator=generator
        )
        prefix = Prefix(model_type="gpt2", targets={"decoder": decoder})
        meta = make_meta(f"tenant{i}/p", prefix, save_prefix(prefix), "native", False)
        targets = {k: v.to(device=backbone.device, dtype=backbone.dtype) for k, v in prefix.targets.items()}
        out.append(DevicePrefix(meta=meta, targets=targets, num_bytes=prefix.num_bytes))
    return out


def mix(
    num_requests: int, num_tenants: int, vocab: int, rng: random.Random
) -> list[tuple[int, list[int], int]]:
    """(tenant, prompt ids, new tokens): prompts and outputs of 20-300 tokens."""
    return [
        (
            i % num_tenants,
            [rng.randrange(1, vocab) for _ in range(rng.randint(20, 300))],
            rng.randint(20, 300),
        )
        for i in range(num_requests)
    ]


def run(backbone, prefixes, jobs, config) -> dict[str, Any]:
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams

    engine = Engine(backbone, config)
    pool = engine.runner.block_pool
    decode_rows: list[int] = []
    peak = {"prefix_blocks": 0, "sequence_blocks": 0}

    def watch(requests) -> None:
        if requests and requests[0].row >= 0 and len(requests) >= len(engine.scheduler.running):
            decode_rows.append(len(requests))  # a decode step runs every running row
        if pool is not None:
            peak["prefix_blocks"] = max(peak["prefix_blocks"], pool.num_prefix_blocks)
            peak["sequence_blocks"] = max(peak["sequence_blocks"], pool.num_sequence_blocks)

    engine.runner.on_forward = watch

    async def one(tenant: int, prompt: list[int], new_tokens: int) -> int:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        prefix = prefixes[tenant]
        request = engine.add(prompt, params, prefix, prefix.id, tenant=f"tenant{tenant}")
        return sum([o.token_id is not None async for o in engine.stream(request)])

    async def everything() -> list[int]:
        return await asyncio.gather(*(one(*job) for job in jobs))

    engine.start()
    try:
        start = time.perf_counter()
        tokens = asyncio.run(everything())
        seconds = time.perf_counter() - start
    finally:
        engine.stop()
    figures: dict[str, Any] = {
        "max_concurrent": max(decode_rows),
        "mean_concurrent": round(sum(decode_rows) / len(decode_rows), 1),
        "output_tokens": sum(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "steps": engine.num_steps,
        "kv_bytes": engine.runner.cache.num_bytes,
    }
    if pool is not None:
        figures |= {
            "blocks": pool.num_usable,
            "peak_prefix_blocks": peak["prefix_blocks"],
            "peak_sequence_blocks": peak["sequence_blocks"],
            "prefix_evictions": pool.num_evictions,
            "preemptions": engine.scheduler.num_preemptions,
        }
    return figures


def ratio(results: dict[str, Any], name: str) -> float:
    """Median tokens/s of run `name` over the slot cache's."""
    return round(results[name]["tokens_per_s"]["median"] / results["slots"]["tokens_per_s"]["median"], 3)


def beam_group(block_size: int, max_model_len: int) -> dict[str, Any]:
    """Positions a 4-beam group (prefix 128, prompt 200, 100 new tokens) reserves in each layout."""
    from server.engine.block_pool import BlockPool

    pool = BlockPool(10_000, block_size)
    pool.admit(0, "p", 128, 200 + 100, num_seqs=4, num_shared=200)
    paged = (pool.num_usable - pool.num_free) * block_size
    return {
        "slots_positions": 4 * max_model_len,  # 4 slots, each with its copy of the prefix and the prompt
        "paged_positions": paged,
        "paged_prefix_copies": 1,
        "paged_prompt_copies": 1,  # whole blocks shared; the block where the prompt ends is each beam's own
        "independent_paged_positions": 4 * (pool.blocks_for(128) + pool.blocks_for(300)) * block_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backbone_args(parser)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--budget-seqs", type=int, default=16, help="KV budget: this many full-length slots")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="row cap of the paged run")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each layout, interleaved")
    parser.add_argument("--write", action="store_true", help="write bench/results/kv_capacity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.record import spread
    from server.engine import paged_kernel
    from server.engine.backbone import load_backbone
    from server.engine.engine import EngineConfig
    from server.engine.kv_cache import KVCache

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        backbone = load_backbone(model_dir, args.device, "float32")
        prefixes = tenant_prefixes(backbone, args.tenants, rng)
        jobs = mix(args.requests, args.tenants, args.vocab, rng)
        budget = args.budget_seqs * KVCache.bytes_per_slot(
            backbone.shape, args.max_model_len, 0, backbone.dtype
        )
        common = {"max_model_len": args.max_model_len, "max_prefix_tokens": 128, "kv_cache_bytes": budget}
        paged = {"kv_layout": "paged", "kv_block_size": args.block_size}
        configs = {
            "slots": EngineConfig(max_num_seqs=args.max_num_seqs, **common),
            "paged": EngineConfig(max_num_seqs=args.max_num_seqs, **common, **paged),
            "paged_same_rows": EngineConfig(max_num_seqs=args.budget_seqs, **common, **paged),
        }
        run(backbone, prefixes, jobs[:8], configs["slots"])  # warm-up (and the paged kernel's build)
        run(backbone, prefixes, jobs[:8], configs["paged"])
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # interleaved: a busy machine slows every layout alike
            for name, config in configs.items():
                samples[name].append(run(backbone, prefixes, jobs, config))
        results = {}
        for name, runs in samples.items():
            results[name] = runs[-1] | {"tokens_per_s": spread([r["tokens_per_s"] for r in runs])}
    figures = {
        "settings": {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "vocab": args.vocab,
            "device": args.device,
            "threads": args.threads,
            "requests": args.requests,
            "tenants": args.tenants,
            "prefix_tokens": "16-128",
            "prompt_tokens": "20-300",
            "new_tokens": "20-300",
            "max_model_len": args.max_model_len,
            "budget_bytes": budget,
            "budget_full_slots": args.budget_seqs,
            "block_size": args.block_size,
            "repeats": args.repeats,
        },
        "runs": results,
        "concurrency_x_slots": round(
            results["paged"]["max_concurrent"] / results["slots"]["max_concurrent"], 2
        ),
        "tokens_per_s_x_slots": ratio(results, "paged"),
        "same_rows_tokens_per_s_x_slots": ratio(results, "paged_same_rows"),
        "paged_decode_kernel": paged_kernel.load() is not None,
        "beam_group_4": beam_group(args.block_size, args.max_model_len),
    }
    print(json.dumps(figures, indent=2))
    if args.write:
        from bench.record import write_result

        write_result("kv_capacity", "bench.kv_capacity", figures)


if __name__ == "__main__":
    main()
