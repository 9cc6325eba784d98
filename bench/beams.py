"""Beam search in the engine: a mix where a quarter of the requests use num_beams=4 vs the same requests
greedy, and the KV a beam group holds vs four independent requests.

    .venv/bin/python -m bench.beams                                   # GPT-2, 4 layers, width 256, CPU
    .venv/bin/python -m bench.beams --layers 12 --width 768 --heads 12 --requests 128 --device cuda

In-process (the engine's front, no HTTP), so the figures are the engine's. The backbone is built with
random weights (bench.throughput.build_backbone, nothing downloaded); every request has its own random
prefix (4..32 virtual tokens). Greedy requests ignore EOS so they all generate --new-tokens; a beam group
cannot ignore EOS (HF's semantics) and stops when HF's would. Reported: wall time, the tokens the
requests got (output tokens/s), and the rows the forward passes ran (row-steps/s: a beam group runs
k rows per step for one answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.throughput import add_backbone_args, build_backbone, prefix_lengths, workload


def random_prefixes(backbone, num: int, device) -> list:
    from prefix_store.cache import DevicePrefix
    from prefix_store.format import Prefix, save_prefix
    from prefix_store.store import make_meta

    shape = backbone.shape
    out = []
    for i, length in enumerate(prefix_lengths(num)):
        generator = torch.Generator().manual_seed(i)
        decoder = torch.randn(
            shape.num_layers, 2, shape.num_heads, length, shape.head_dim, generator=generator
        )
        prefix = Prefix(model_type="gpt2", targets={"decoder": decoder})
        meta = make_meta(f"bench/p{i}", prefix, save_prefix(prefix), "native", False)
        targets = {k: v.to(device=device, dtype=backbone.dtype) for k, v in prefix.targets.items()}
        out.append(DevicePrefix(meta=meta, targets=targets, num_bytes=prefix.num_bytes))
    return out


def run(backbone, jobs, max_num_seqs: int) -> dict:
    """Run (prefix, prompt, params) jobs together; returns wall time, tokens and row-steps."""
    from server.engine.engine import Engine, EngineConfig

    rows: list[int] = []
    engine = Engine(
        backbone,
        EngineConfig(max_num_seqs=max_num_seqs, max_model_len=1024),
        on_forward=lambda requests: rows.append(len(requests)),
    )

    async def one(prefix, prompt, params) -> int:
        request = engine.add(engine.tokenize(prompt), params, prefix, prefix.id)
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
    # on_forward gets each forward's rows (a beam group's request k times in a decode)
    return {
        "seconds": seconds,
        "output_tokens": sum(tokens),
        "row_steps": sum(rows),
        "steps": engine.num_steps,
    }


def kv_cost(backbone, prefix, prompt: str, new_tokens: int, num_beams: int) -> dict:
    """Peak KV entries written (all slots, all layers) for one beam group vs num_beams greedy requests."""
    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import SamplingParams

    figures = {}
    for label, jobs in (
        ("beam_group", [SamplingParams(max_new_tokens=new_tokens, num_beams=num_beams)]),
        ("independent", [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * num_beams),
    ):
        engine = Engine(backbone, EngineConfig(max_num_seqs=num_beams, max_model_len=1024))
        runner = engine.runner
        peak = {"slots": 0, "entries": 0}

        def watch(_requests, runner=runner, peak=peak):
            peak["slots"] = max(peak["slots"], len(runner.slots))
            peak["entries"] = max(peak["entries"], sum(s.seq_len for s in runner.slots))

        runner.on_forward = watch

        async def go(engine=engine, jobs=jobs):
            requests = [engine.add(engine.tokenize(prompt), p, prefix, prefix.id) for p in jobs]
            for request in requests:
                async for _ in engine.stream(request):
                    pass

        engine.start()
        try:
            asyncio.run(go())
        finally:
            engine.stop()
        shape = backbone.shape
        bytes_per_entry = (
            shape.num_layers * 2 * shape.num_heads * shape.head_dim * runner.cache.self_kv.element_size()
        )
        slot_bytes = runner.cache.num_bytes // num_beams
        figures[label] = {
            "slots": peak["slots"],
            "reserved_bytes": peak["slots"] * slot_bytes,
            "peak_written_entries": peak["entries"],
            "peak_written_bytes": peak["entries"] * bytes_per_entry,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backbone_args(parser, vocab=2000)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from server.engine.backbone import load_backbone
    from server.engine.request import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        backbone = load_backbone(model_dir, args.device, "float32")
        prefixes = random_prefixes(backbone, args.requests, backbone.device)
        pairs = workload(args.requests, args.requests)
        greedy = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        beam = SamplingParams(max_new_tokens=args.new_tokens, num_beams=args.beams)
        mixed = [(prefixes[i], prompt, beam if i % 4 == 0 else greedy) for i, prompt in pairs]
        plain = [(prefixes[i], prompt, greedy) for i, prompt in pairs]
        run(backbone, plain[:4], args.max_num_seqs)  # warm-up
        results = {"all_greedy": run(backbone, plain, args.max_num_seqs)}
        results["quarter_beams"] = run(backbone, mixed, args.max_num_seqs)
        for figures in results.values():
            figures["output_tokens_per_s"] = round(figures["output_tokens"] / figures["seconds"], 1)
            figures["row_steps_per_s"] = round(figures["row_steps"] / figures["seconds"], 1)
            figures["seconds"] = round(figures["seconds"], 3)
        kv = kv_cost(backbone, prefixes[5], pairs[5][1], args.new_tokens, args.beams)
    report = {
        "backbone": f"gpt2 layers={args.layers} width={args.width} heads={args.heads} vocab={args.vocab}",
        "device": args.device,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "num_beams": args.beams,
        "throughput": results,
        "kv_one_group_vs_independent": kv,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
