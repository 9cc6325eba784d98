"""The host path: server CPU per generated token where the forward is cheap, beside HF's and the engine's alone.

    .venv/bin/python -m bench.host_path                                   # this checkout
    .venv/bin/python -m bench.host_path --before-root /path/to/other/checkout   # and the same load on that code

A GPT-2 of 1 layer x 64 with a vocabulary of 700 (random weights, bench.throughput's recipe), so a forward at
256 rows is cheap beside a real model's and the host's work shows: 256 concurrent requests x 64 tokens (EOS
ignored) over 16 prefixes round-robin, over HTTP, as whole responses and streamed (SSE). Per round: the
server's CPU (its process tree, from /proc) per generated token, split between the HTTP front's process and the
runner's child (whose forward, on a CPU, is most of it). Beside it, in the same run, HF's batched `generate` of
the same 256 prompts with no prefix on one thread (this process's CPU per token), and the engine alone: this
checkout's Engine in this process on one thread, the same prompts and prefixes, no HTTP, no runner process (the
floor the server's figures stand on). And the engine's host time per step (step minus forward, from /metrics)
with 64 and with 256 requests in flight. With --before-root both servers are up at once and the rounds
interleave, so a drift of a shared machine falls on both alike. The best of --repeats rounds is kept (its
event-loop thread's CPU and write system calls per token beside it), and the median over the rounds. The
servers run their own default (--runner-process true since it became the default) unless --runner-process says
otherwise. Writes bench/results/host_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.record import write_result
from bench.sampling import (
    bodies_for,
    cpu_seconds,
    engine_seconds,
    native_prefixes,
    own_cpu_seconds,
    round_trip,
    start_server,
)
from bench.throughput import ROOT, build_backbone, workload


def hf_cpu_per_token(model_dir: Path, jobs: list[tuple[int, str]], new_tokens: int) -> float:
    """µs of this process's CPU per token for HF's batched generate of the prompts, no prefix, one thread."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tokenizer([prompt for _, prompt in jobs], return_tensors="pt", padding=True)
    best = float("inf")
    for _ in range(2):
        started = time.process_time()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # as the server's ignore_eos: every row generates them all
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        best = min(best, (time.process_time() - started) / tokens * 1e6)
    return best


def engine_cpu_per_token(
    model_dir: Path, jobs: list[tuple[int, str]], new_tokens: int, num_prefixes: int
) -> float:
    """µs of this process's CPU per token for the engine alone: in this process on one thread, no HTTP and no
    runner process, the same prompts and the server's prefixes (bench.sampling's files), all queued at once and
    stepped to the end (every row prefilled, then decoded). The floor the server's figures stand on."""
    import server.engine.engine as engine_module
    from prefix_store.cache import DevicePrefix
    from prefix_store.format import load_prefix
    from prefix_store.store import make_meta
    from server.engine.backbone import load_backbone
    from server.engine.request import Request, SamplingParams
    from server.host_memory import retain_freed_memory

    torch.set_num_threads(1)
    retain_freed_memory(os.environ)  # as the server does at start
    backbone = load_backbone(model_dir, "cpu", "float32")
    prefixes = []
    for i, data in enumerate(native_prefixes(model_dir, num_prefixes)):
        prefix = load_prefix(data)
        meta = make_meta(f"bench/p{i}", prefix, data, "native", False)
        prefixes.append(DevicePrefix(meta=meta, targets=dict(prefix.targets), num_bytes=prefix.num_bytes))
    best = float("inf")
    for _ in range(2):
        engine = engine_module.Engine(backbone, engine_module.EngineConfig(max_num_seqs=len(jobs)))
        requests = []
        for i, (index, prompt) in enumerate(jobs):
            prefix = prefixes[index]
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            requests.append(
                Request(f"r{i}", engine.tokenize(prompt), params, prefix=prefix, prefix_id=prefix.id,
                        num_prefix_tokens=prefix.num_virtual_tokens)
            )  # fmt: skip
            engine.scheduler.add(requests[-1])
        started = time.process_time()
        while engine.scheduler.has_work():
            engine.step()
        seconds = time.process_time() - started
        tokens = sum(len(r.output_token_ids) for r in requests)
        if tokens != len(jobs) * new_tokens:
            raise RuntimeError(f"the engine alone made {tokens} tokens, not {len(jobs) * new_tokens}")
        best = min(best, seconds / tokens * 1e6)
    return best


def loop_thread(pid: int) -> tuple[float, int]:
    """(CPU seconds of the server's main thread, which runs the event loop; its process's write system calls so
    far: socket writes and log lines) from /proc."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    writes = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/io").read_text().splitlines()
                  if line.startswith("syscw"))  # fmt: skip
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), writes


def server_round(url: str, pid: int, jobs, new_tokens: int, stream: bool) -> dict:
    """One round: the server's CPU µs per generated token (and its event loop's), tokens/s, write system calls
    per token, and its host ms per step."""
    bodies = bodies_for("greedy", jobs, new_tokens)
    if stream:
        for body in bodies:
            body["stream"] = True
    with httpx.Client(base_url=url, timeout=60) as client:
        before, cpu_before, loop_before = engine_seconds(client), cpu_seconds(pid), loop_thread(pid)
        front_before = own_cpu_seconds(pid)
        seconds, tokens = asyncio.run(round_trip(url, bodies))
        cpu, loop = cpu_seconds(pid) - cpu_before, loop_thread(pid)
        front = own_cpu_seconds(pid) - front_before
        steps, step_s, forward_s, _ = (a - b for a, b in zip(engine_seconds(client), before, strict=True))
    if tokens != len(jobs) * new_tokens:
        raise RuntimeError(f"{tokens} tokens came back, not {len(jobs) * new_tokens}")
    return {
        "server_cpu_us_per_token": cpu / tokens * 1e6,
        # the HTTP front's process and the runner's child (0 with --runner-process false) apart
        "front_cpu_us_per_token": front / tokens * 1e6,
        "runner_process_cpu_us_per_token": (cpu - front) / tokens * 1e6,
        "event_loop_cpu_us_per_token": (loop[0] - loop_before[0]) / tokens * 1e6,
        "writes_per_token": (loop[1] - loop_before[1]) / tokens,
        "tokens_per_s": tokens / seconds,
        "host_ms_per_step": (step_s - forward_s) / steps * 1e3,
        "forward_ms_per_step": forward_s / steps * 1e3,
        "steps": steps,
    }


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "true"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before-root", type=Path, help="another checkout to run the same load against")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--runner-process",
        choices=["true", "false"],
        help="every server with this --runner-process (default: theirs)",
    )
    args = parser.parse_args()
    args.layers, args.width, args.heads, args.vocab = 1, 64, 2, 700
    roots = {"this": ROOT, **({"before": args.before_root} if args.before_root else {})}
    jobs = workload(args.requests, args.prefixes)
    rounds = {
        "whole": (jobs, False),
        "streamed": (jobs, True),
        "whole_64_rows": (jobs[:64], False),
    }
    best: dict[str, dict[str, dict]] = {name: {} for name in roots}
    every: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in rounds} for name in roots}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        hf = hf_cpu_per_token(model_dir, jobs, args.new_tokens)
        engine_alone = engine_cpu_per_token(model_dir, jobs, args.new_tokens, args.prefixes)
        servers = {
            name: start_server(stack, model_dir, Path(tmp) / name, args, 1, root, _flag(args.runner_process))
            for name, root in roots.items()
        }
        for _ in range(args.repeats):
            for name, server in servers.items():
                for mode, (mode_jobs, stream) in rounds.items():
                    figures = server_round(server.url, server.process.pid, mode_jobs, args.new_tokens, stream)
                    every[name][mode].append(figures["server_cpu_us_per_token"])
                    kept = best[name].get(mode)
                    if kept is None or figures["server_cpu_us_per_token"] < kept["server_cpu_us_per_token"]:
                        best[name][mode] = figures
    for name, by_mode in best.items():
        for mode in rounds:  # the median too: on a shared machine the best of a few rounds is a lucky one
            by_mode[mode]["median_server_cpu_us_per_token"] = statistics.median(every[name][mode])
        for mode in ("whole", "streamed"):
            by_mode[mode]["x_hf"] = by_mode[mode]["server_cpu_us_per_token"] / hf
    figures = {
        "hf_batched_no_prefix_cpu_us_per_token": hf,
        "engine_alone_cpu_us_per_token": engine_alone,
        "engine_alone_x_hf": engine_alone / hf,
        **best,
    }
    if "before" in best:
        figures["before_over_this"] = {
            mode: best["before"][mode]["server_cpu_us_per_token"]
            / best["this"][mode]["server_cpu_us_per_token"]
            for mode in rounds
        }
    write_result("host_path", "bench.host_path", figures)
    print(f"HF batched generate, no prefix: {hf:.1f} µs CPU per token")
    print(f"the engine alone, no HTTP: {engine_alone:.1f} µs CPU per token ({engine_alone / hf:.2f}x HF)")
    for name, by_mode in best.items():
        for mode, f in by_mode.items():
            ratio = f" ({f['x_hf']:.2f}x HF)" if "x_hf" in f else ""
            print(
                f"{name:>6} {mode:>14}: {f['server_cpu_us_per_token']:6.1f} µs/token{ratio} (median "
                f"{f['median_server_cpu_us_per_token']:.1f}; front {f['front_cpu_us_per_token']:.1f}, runner "
                f"process {f['runner_process_cpu_us_per_token']:.1f}, event loop {f['event_loop_cpu_us_per_token']:.1f}, "
                f"{f['writes_per_token']:.2f} writes/token), host {f['host_ms_per_step']:.2f} ms/step, "
                f"forward {f['forward_ms_per_step']:.2f} ms/step"
            )
    for mode, ratio in figures.get("before_over_this", {}).items():
        print(f"before / this, {mode}: {ratio:.2f}x the CPU per token")


if __name__ == "__main__":
    main()
