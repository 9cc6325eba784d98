"""Where a decode step goes: torch.profiler over steady decode steps of the engine, in-process.

    python -m bench.profile_step --device cuda                                   # GPT-2-medium shape, batch 64
    python -m bench.profile_step --device cuda --layers 12 --width 768 --heads 12 --batch 256
    .venv/bin/python -m bench.profile_step --layers 2 --width 64 --heads 2 --vocab 2000 --batch 8   # CPU, a look

The backbone is built with random weights (bench.throughput.build_backbone); --batch requests, each with one
of --prefixes random prefixes (4..32 virtual tokens), are prefilled and decoded a few steps untimed; then
--steps engine steps (`Engine.step`: schedule, forward, sampler, bookkeeping) are timed with a device sync
around them, and the same number again under torch.profiler. Reported per step, with greedy rows launched
eagerly (--cuda-graphs false), greedy rows and sampled ones (temperature 0.8, top-k 50, top-p 0.95, a seed
each) with decode steps as CUDA graph replays (the default on CUDA; on CPU all three run eagerly):
- wall ms (what a step costs), GPU busy ms (the union of kernel and copy intervals on the device), and the
  GPU's idle share: a step whose GPU is idle most of the time is launch/host-bound;
- kernels run, kernel launches issued by the host, host-device waits (stream/device/event synchronize and
  blocking copies), and the host's busy time inside the step.
The chrome trace of each profile goes to --trace-dir if given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.throughput import add_backbone_args, build_backbone

LAUNCHES = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)
SYNCS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cuMemcpyDtoH",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_in_decode(backbone, batch: int, num_prefixes: int, sampled: bool, steps: int, graphs: bool):
    """An engine whose `batch` requests are all prefilled and decoding (ignore_eos: none leaves early)."""
    from bench.beams import random_prefixes
    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import Request, SamplingParams

    prefixes = random_prefixes(backbone, num_prefixes, backbone.device)
    engine = Engine(backbone, EngineConfig(max_num_seqs=batch, max_model_len=1024, cuda_graphs=graphs))
    prompt = engine.tokenize("name : Blue Spice | Type : coffee shop | area : city centre")
    for i in range(batch):
        extra = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": i} if sampled else {}
        params = SamplingParams(max_new_tokens=4 * steps + 16, ignore_eos=True, **extra)
        prefix = prefixes[i % num_prefixes]
        engine.scheduler.add(
            Request(
                f"r{i}",
                prompt,
                params,
                prefix=prefix,
                prefix_id=prefix.id,
                num_prefix_tokens=prefix.num_virtual_tokens,
            )
        )
    while engine.scheduler.num_waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    return engine


def busy_union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def profile(engine, steps: int, trace: Path) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = engine.backbone.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    wall = (time.perf_counter() - started) / steps
    forward_before = engine.runner.forward_seconds
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    forward = (engine.runner.forward_seconds - forward_before) / steps
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    return {
        "wall_ms": wall * 1e3,
        "forward_ms": forward * 1e3,
        "gpu_busy_ms": busy_union([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3 / steps,
        "kernels": len(kernels) / steps,
        "launches": sum(e["name"] in LAUNCHES for e in host) / steps,
        "syncs": sum(e["name"] in SYNCS for e in host) / steps,
        "top_kernels": top(kernels, steps),
    }


def top(kernels: list[dict], steps: int, n: int = 8) -> list[tuple[str, float, float]]:
    """The kernels that take the most device time: (name, count per step, µs per step)."""
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"][:80], []).append(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [(name, len(d) / steps, sum(d) / steps) for name, d in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backbone_args(parser, vocab=50257)
    parser.set_defaults(layers=24, width=1024, heads=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trace-dir", type=Path)
    args = parser.parse_args()
    from server.engine.backbone import load_backbone

    with tempfile.TemporaryDirectory() as tmp:
        model = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        backbone = load_backbone(model, args.device, args.dtype)
        trace_dir = args.trace_dir or Path(tmp)
        trace_dir.mkdir(parents=True, exist_ok=True)
        rows = {}
        modes = {"greedy, eager": (False, False), "greedy": (False, True), "sampled": (True, True)}
        for mode, (sampled, graphs) in modes.items():
            engine = engine_in_decode(backbone, args.batch, args.prefixes, sampled, args.steps, graphs)
            rows[mode] = profile(engine, args.steps, trace_dir / f"trace-{mode.replace(', ', '-')}.json")
            del engine
    print(
        f"\nGPT-2 {args.layers}x{args.width}, vocab {args.vocab}, {args.dtype} on {args.device}, "
        f"batch {args.batch}, {args.steps} decode steps"
    )
    print("| rows | wall ms/step | forward ms | GPU busy ms | GPU idle | kernels | launches | host waits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        idle = 1 - r["gpu_busy_ms"] / r["wall_ms"] if r["gpu_busy_ms"] else float("nan")
        print(
            f"| {mode} | {r['wall_ms']:.2f} | {r['forward_ms']:.2f} | {r['gpu_busy_ms']:.2f} | {idle:.0%} | "
            f"{r['kernels']:.0f} | {r['launches']:.0f} | {r['syncs']:.1f} |"
        )
    for mode, r in rows.items():
        print(f"\n{mode}: kernels by device time per step (count, µs)")
        for name, count, micros in r["top_kernels"]:
            print(f"  {count:5.1f}  {micros:8.1f}  {name}")


if __name__ == "__main__":
    main()
