"""Sampling and streaming cost next to greedy, over HTTP, and the engine's host time per step.

    .venv/bin/python -m bench.sampling                  # GPT-2 4 layers x 256, 64 requests x 128 tokens, 8 prefixes
    .venv/bin/python -m bench.sampling --device cuda --layers 24 --width 1024 --heads 16
    .venv/bin/python -m bench.sampling --before-root /path/to/other/checkout   # and the same load on other code
    .venv/bin/python -m bench.sampling --stream-interval 4   # the server groups a stream's events 4 tokens a write

Rounds of the same 64 concurrent requests (E2E prompts, 8 prefixes round-robin, EOS ignored so each
generates exactly --new-tokens): greedy; sampled (temperature 0.8, top-k 50, top-p 0.95, a seed each);
sampled and streamed (SSE); and top-p alone (temperature 1, top-p 0.9, no top-k: the sampler must find the
nucleus in the whole vocabulary). Per round: tokens/s and its ratio to greedy; the engine's step split into
forward and host time, and "wait", the part its thread spent off the CPU (on CPU, the GIL held by the HTTP
front: what streaming costs the engine), from /metrics; the CPU seconds of the server and of this client.
With --before-root the same rounds run against that checkout's server too, both up at once, rounds
interleaved. The paired ratio (each repeat's rate over the same repeat's greedy rate on the same server,
median and range) is the figure to read on a machine whose speed drifts; a best-of ratio may divide rounds
minutes apart. The backbone is built here with random weights; nothing is downloaded. Writes
bench/results/sampling.json (rendered into bench/README.md by bench.report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.record import spread, write_result
from bench.throughput import ROOT, add_backbone_args, build_backbone, workload

sys.path.insert(0, str(ROOT / "tests"))

SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
TOP_P_ONLY = {"temperature": 1.0, "top_p": 0.9}
MODES = ("greedy", "sampled", "sampled+streamed", "top-p only")


def native_prefixes(model_dir: Path, num_prefixes: int) -> list[bytes]:
    from prefix_store.format import Prefix, save_prefix

    config = json.loads((model_dir / "config.json").read_text())
    layers, heads = config["n_layer"], config["n_head"]
    head_dim = config["n_embd"] // heads
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(num_prefixes):
        tensor = torch.randn(layers, 2, heads, 5 + 3 * i, head_dim, generator=g) * 0.5
        out.append(save_prefix(Prefix("gpt2", {"decoder": tensor})))
    return out


def engine_seconds(client: httpx.Client) -> tuple[float, float, float, float]:
    """(steps, step seconds, forward seconds, the engine thread's CPU seconds in steps) so far; NaN where the
    server does not report one (a checkout from before the metric)."""
    text = client.get("/metrics").text

    def value(name: str) -> float:
        found = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else float("nan")

    return (
        value("prefixserve_engine_steps"),
        value("prefixserve_engine_step_seconds"),
        value("prefixserve_engine_forward_seconds"),
        value("prefixserve_engine_step_cpu_seconds"),
    )


async def one(client: httpx.AsyncClient, body: dict) -> int:
    if not body.get("stream"):
        response = await client.post("/v1/generate", json=body)
        response.raise_for_status()
        return len(response.json()["token_ids"])
    return await streamed(client.base_url, body)


async def streamed(url: httpx.URL, body: dict) -> int:
    """One streamed generation over a plain HTTP/1.1 connection: every event is received as the server sends
    it; the body is split into events once at the end. A lean reader on purpose: httpx's per-chunk parsing
    (aiter_lines) cost the client ~5x more CPU than the server's own streaming work, and the client shares
    this machine's cores with the server (figures in bench/README.md)."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload)
    )
    chunks = []
    while chunk := await reader.read(1 << 16):
        chunks.append(chunk)
    writer.close()
    head, _, events = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream failed: {head.decode(errors='replace')}")
    if b"data: [DONE]" not in events:
        raise RuntimeError("stream ended without [DONE]")
    return events.count(b'{"token_id": ')


async def round_trip(url: str, bodies: list[dict]) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(client, b) for b in bodies))
        return time.perf_counter() - started, sum(counts)


def bodies_for(mode: str, jobs: list[tuple[int, str]], new_tokens: int) -> list[dict]:
    out = []
    for i, (prefix, prompt) in enumerate(jobs):
        body: dict = {"prefix": f"bench/p{prefix}", "prompt": prompt, "max_new_tokens": new_tokens}
        body["ignore_eos"] = True
        if mode != "greedy":
            body.update(TOP_P_ONLY if mode == "top-p only" else SAMPLED, seed=i)
        if mode == "sampled+streamed":
            body["stream"] = True
        out.append(body)
    return out


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (every thread), its children apart, so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (--runner-process) so far (Linux /proc)."""
    return own_cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(child) for child in (task / "children").read_text().split()]
    return out


def page_faults(pid: int) -> int:
    """Minor page faults of a process and its live children so far (Linux /proc): pages the kernel mapped (and
    zeroed) on first touch."""
    own = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])
    return own + sum(page_faults(child) for child in children(pid))


def prepare(url: str, model_dir: Path, num_prefixes: int) -> None:
    """Upload the bench's prefixes (bench/p0...) to the server and warm its prefix cache."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, data in enumerate(native_prefixes(model_dir, num_prefixes)):
            headers = {"Content-Type": "application/octet-stream"}
            client.put(f"/v1/prefixes/bench/p{i}", content=data, headers=headers).raise_for_status()
    jobs = workload(num_prefixes, num_prefixes)
    asyncio.run(round_trip(url, bodies_for("greedy", jobs, 8)))


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """The backbone's flags and the load's: --prefixes, --requests, --new-tokens, --device."""
    add_backbone_args(parser)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")


def server_args(
    args: argparse.Namespace, stream_interval: int, runner_process: bool | None = None
) -> list[str]:
    """prefix-serve flags for the load: a slot per request, and the device, stream interval and runner process
    asked for (None: the server's default)."""
    out = ["--max-num-seqs", str(args.requests), "--max-model-len", "1024"]
    if runner_process is not None:
        out += ["--runner-process", "true" if runner_process else "false"]
    if stream_interval != 1:  # a checkout from before the flag rejects it
        out += ["--stream-interval", str(stream_interval)]
    if args.device != "cpu":
        # after start_server's --device cpu: these win (float32 as everywhere else; auto is bfloat16 there)
        out += ["--device", args.device, "--dtype", "float32"]
    return out


def one_round(client: httpx.Client, url: str, mode: str, jobs, args: argparse.Namespace, pid: int) -> dict:
    """One round of `mode` against the server at `url` (process `pid`): tokens/s, step/forward/host ms, the
    step time the engine's thread spent off the CPU (wait ms: on CPU, mostly waiting for the GIL), steps,
    the server's and this client's CPU seconds, the server's minor page faults per step."""
    before = engine_seconds(client)
    cpu_before = cpu_seconds(pid), time.process_time()
    faults_before = page_faults(pid)
    seconds, tokens = asyncio.run(round_trip(url, bodies_for(mode, jobs, args.new_tokens)))
    server_cpu, client_cpu = cpu_seconds(pid) - cpu_before[0], time.process_time() - cpu_before[1]
    faults = page_faults(pid) - faults_before
    if tokens != args.requests * args.new_tokens:
        raise RuntimeError(f"{mode}: {tokens} tokens came back, not {args.requests * args.new_tokens}")
    steps, step_s, forward_s, cpu_s = (a - b for a, b in zip(engine_seconds(client), before, strict=True))
    return {"tokens_per_s": tokens / seconds, "step_ms": step_s / steps * 1e3,
            "forward_ms": forward_s / steps * 1e3, "host_ms": (step_s - forward_s) / steps * 1e3,
            "wait_ms": None if math.isnan(cpu_s) else (step_s - cpu_s) / steps * 1e3,
            "steps": steps, "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
            "faults_per_step": faults / steps}  # fmt: skip


def start_server(
    stack: contextlib.ExitStack, model_dir: Path, workdir: Path, args: argparse.Namespace, stream_interval: int,
    checkout: Path = ROOT, runner_process: bool | None = None,
):  # fmt: skip
    """A prefix-serve for the load from `checkout`, stopped with `stack`, with the bench's prefixes uploaded and
    warm (its store and logs under `workdir`)."""
    import serving  # tests/serving.py, on the path set above

    server = stack.enter_context(
        serving.running_server(
            model_dir,
            str(workdir / "store"),
            workdir / "logs",
            args=server_args(args, stream_interval, runner_process),
            checkout=checkout,
        )
    )
    prepare(server.url, model_dir, args.prefixes)
    return server


def run_rounds(roots: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """name -> mode -> figures of the best of --repeats rounds, and "x_greedy_paired": the mode's rate over the
    greedy round's of the same repeat on the same server (run a few seconds apart), per repeat, with their
    median. Every checkout's server runs at once (idle while another is measured) and the rounds interleave:
    each repeat runs every mode on every server in turn, so a drift of a shared machine falls on all of them
    alike rather than on whichever mode ran last."""
    jobs = workload(args.requests, args.prefixes)
    best: dict[str, dict[str, dict]] = {name: {} for name in roots}
    rates: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in args.modes} for name in roots}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = build_backbone(Path(tmp) / "model", args.layers, args.width, args.heads, args.vocab)
        servers = {
            name: start_server(
                stack,
                model_dir,
                Path(tmp) / name,
                args,
                args.stream_interval,
                root,
                # explicit both ways: the wait column (the engine thread off the CPU) is the GIL only in one process
                args.runner_process and name == "this",
            )
            for name, root in roots.items()
        }
        for _ in range(args.repeats):
            for name, server in servers.items():
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    for mode in args.modes:
                        figures = one_round(client, server.url, mode, jobs, args, server.process.pid)
                        rates[name][mode].append(figures["tokens_per_s"])
                        if (
                            mode not in best[name]
                            or figures["tokens_per_s"] > best[name][mode]["tokens_per_s"]
                        ):
                            best[name][mode] = figures
    for name, by_mode in best.items():
        greedy = rates[name]["greedy"]
        for mode, figures in by_mode.items():
            paired = [rate / g for rate, g in zip(rates[name][mode], greedy, strict=True)]
            figures["x_greedy_paired"] = spread(paired)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_args(parser)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per mode (the best is reported)")
    parser.add_argument("--before-root", type=Path, help="also run the same load on this checkout's server")
    parser.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=list(MODES),
        help=f"comma-separated rounds to run, greedy always among them (default: {','.join(MODES)})",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the server's --stream-interval (tokens per stream write)",
    )
    parser.add_argument(
        "--runner-process",
        action="store_true",
        help="this checkout's server runs its forward passes in a child process (--runner-process true); with "
        "--before-root . the same checkout in one process runs beside it",
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results/sampling.json")
    args = parser.parse_args()
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose among {', '.join(MODES)}")
    args.modes = [mode for mode in MODES if mode in {"greedy", *args.modes}]

    roots = {"this": ROOT, **({"before": args.before_root} if args.before_root else {})}
    results = run_rounds(roots, args)
    print(f"{args.requests} requests x {args.new_tokens} tokens, {args.prefixes} prefixes, GPT-2 "
          f"{args.layers}x{args.width} on {args.device}, --stream-interval {args.stream_interval}")  # fmt: skip
    for name, by_mode in results.items():
        for f in by_mode.values():
            f["x_greedy"] = f["tokens_per_s"] / by_mode["greedy"]["tokens_per_s"]
        in_child = args.runner_process and name == "this"
        print(f"server from {roots[name]}" + (" (--runner-process)" if in_child else ""))
        print(
            f"{'mode':<18} {'tokens/s':>9} {'x greedy':>9} {'paired x greedy':>20} {'step ms':>8} "
            f"{'forward ms':>11} {'host ms':>8} {'wait ms':>8} "
            f"{'steps':>6} {'server cpu s':>13} {'client cpu s':>13} {'faults/step':>12}"
        )
        for mode, f in by_mode.items():
            print(f"{mode:<18} {f['tokens_per_s']:>9.0f} {f['x_greedy']:>9.2f} {_paired(f):>20} {f['step_ms']:>8.2f} "
                  f"{f['forward_ms']:>11.2f} {f['host_ms']:>8.2f} {_ms(f['wait_ms']):>8} {f['steps']:>6.0f} "
                  f"{f['server_cpu_s']:>13.2f} {f['client_cpu_s']:>13.2f} {f['faults_per_step']:>12.0f}")  # fmt: skip
    if not args.no_record:
        settings = {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "prefixes", "requests",
                                                  "new_tokens", "device", "repeats", "stream_interval",
                                                  "runner_process")}  # fmt: skip
        settings["interleaved"] = True  # rounds interleaved across modes and servers (older records were not)
        before = (
            {"root": str(args.before_root), "commit": commit_of(args.before_root)}
            if args.before_root
            else None
        )
        figures = {"settings": settings, "sampled": SAMPLED, "top_p_only": TOP_P_ONLY, "this": results["this"],
                   "commit": commit_of(ROOT), "before": before and {**before, "results": results["before"]}}  # fmt: skip
        write_result("sampling", "bench.sampling", figures)


def _paired(figures: dict) -> str:
    """The paired ratio to greedy: median (min-max) over the repeats."""
    paired = figures["x_greedy_paired"]
    return f"{paired['median']:.2f} ({paired['min']:.2f}-{paired['max']:.2f})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def commit_of(root: Path) -> str:
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
