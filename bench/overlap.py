"""Overlapped steps with the runner process: the engine's tokens/s and host CPU with --overlap-steps on and off.

    .venv/bin/python -m bench.overlap

The engine as `prefix-serve --runner-process true` builds it (the forward and the sampler in a spawned child),
without HTTP, on random GPT-2s of bench.throughput's recipe: the host-bound shape (1 layer x 64, vocabulary 700)
and the default CPU shape (4 x 256). --requests greedy requests of --new-tokens tokens (EOS ignored, no prefix:
what overlap changes is the host's bookkeeping per step, not the attention) submitted at once. Both engines
are up at once and the rounds alternate; per engine the best of --repeats rounds: tokens/s (wall), this
process's CPU (the engine thread and the front's) and the child's per token, and the share of steps sent
before the previous step's answer was read. The two must give the same tokens. Writes
bench/results/overlap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.record import write_result
from bench.throughput import ROOT, build_backbone

sys.path.insert(0, str(ROOT / "tests"))

from server.engine.backbone import load_backbone  # noqa: E402
from server.engine.engine import Engine, EngineConfig  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402
from server.engine.worker import RunnerProcess, RunnerSpec  # noqa: E402

SHAPES = {"1x64": (1, 64, 2, 700), "4x256": (4, 256, 4, 2048)}


def process_engine(model_dir: Path, rows: int, overlap: bool) -> Engine:
    backbone = load_backbone(model_dir, "cpu", "float32", weights=False)
    spec = RunnerSpec(
        model=str(model_dir), device="cpu", dtype="float32", max_num_seqs=rows, max_model_len=256,
        max_prefix_tokens=64, kv_cache_bytes=None, prefix_cache_bytes=0, cuda_graphs=False,
        retain_host_memory=True, log_level="warning",
    )  # fmt: skip
    runner = RunnerProcess(spec)
    backbone.rules = runner.rules
    config = EngineConfig(max_num_seqs=rows, max_model_len=256, overlap=overlap)
    return Engine(backbone, config, runner=runner)


def one_round(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def run() -> list[list[int]]:
        async def one(ids: list[int]) -> list[int]:
            request = engine.add(ids, params)
            return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

        return await asyncio.gather(*(one(ids) for ids in prompts))

    steps, overlapped, child = engine.num_steps, engine.num_overlapped_steps, engine.runner.cpu_seconds
    started, cpu = time.perf_counter(), time.process_time()
    tokens = asyncio.run(run())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    total = sum(len(t) for t in tokens)
    figures = {
        "tokens_per_s": total / seconds,
        "host_cpu_us_per_token": cpu / total * 1e6,
        "child_cpu_us_per_token": (engine.runner.cpu_seconds - child) / total * 1e6,
        "overlapped_share": (engine.num_overlapped_steps - overlapped) / max(1, engine.num_steps - steps),
    }
    return figures, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = build_backbone(Path(tmp) / shape, *SHAPES[shape])
            prompts = [[(7 * i + j) % 500 + 1 for j in range(8 + i % 9)] for i in range(args.requests)]
            engines = {"overlap": process_engine(model_dir, args.requests, True)}
            engines["no_overlap"] = process_engine(model_dir, args.requests, False)
            best: dict[str, dict] = {}
            outputs: dict[str, list[list[int]]] = {}
            try:
                for engine in engines.values():
                    engine.start()
                    one_round(engine, prompts[:8], 4)  # warm
                for _ in range(args.repeats):
                    for name, engine in engines.items():
                        got, outputs[name] = one_round(engine, prompts, args.new_tokens)
                        if name not in best or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                            best[name] = got
            finally:
                for engine in engines.values():
                    engine.stop()
            if outputs["overlap"] != outputs["no_overlap"]:
                raise RuntimeError(f"{shape}: overlapped steps gave other tokens")
            best["overlap_over_no_overlap_tokens_per_s"] = (
                best["overlap"]["tokens_per_s"] / best["no_overlap"]["tokens_per_s"]
            )  # type: ignore[assignment]
            figures[shape] = best
            for name in engines:
                f = best[name]
                print(
                    f"{shape:>6} {name:>10}: {f['tokens_per_s']:8.0f} tokens/s, host {f['host_cpu_us_per_token']:5.1f} "
                    f"µs/token, child {f['child_cpu_us_per_token']:5.1f} µs/token, "
                    f"{f['overlapped_share']:.0%} of steps overlapped"
                )
            print(
                f"{shape:>6} overlap / no overlap: {best['overlap_over_no_overlap_tokens_per_s']:.2f}x tokens/s"
            )
    write_result("overlap", "bench.overlap", figures)


if __name__ == "__main__":
    main()
