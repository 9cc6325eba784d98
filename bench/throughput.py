"""Side by side on one workload: prefixserve over HTTP vs PEFT one request at a time vs HF batched, no prefix.

    .venv/bin/python -m bench.throughput                      # GPT-2, 4 layers, width 256, 32 requests, 16 prefixes
    .venv/bin/python -m bench.throughput --layers 24 --width 1024 --heads 16 --prefixes 64 --requests 128 --device cuda

The backbone is built here with random weights and a BPE tokenizer trained on ../shared/data (nothing is
downloaded); the prefixes are PEFT prefix-tuning adapters of different lengths, uploaded to prefixserve
as PEFT multipart. Every request generates exactly --new-tokens tokens (EOS ignored) so all three do the
same work. Greedy outputs of prefixserve are checked against PEFT's for every request PEFT ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))


def build_backbone(path: Path, layers: int, width: int, heads: int, vocab: int) -> Path:
    from tiny_models import train_bpe
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    lines = (DATA / "wikitext2" / "valid.txt").read_text().splitlines()
    lines += [line.split("||")[0] for line in (DATA / "e2e" / "valid.txt").read_text().splitlines()]
    vocab_table, merges = train_bpe(lines, ["<|endoftext|>"], vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab_table, merges=merges)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def workload(num_requests: int, num_prefixes: int) -> list[tuple[int, str]]:
    """(prefix index, prompt): E2E meaning representations, prefixes round-robin."""
    sources = list(
        dict.fromkeys(line.split("||")[0] for line in (DATA / "e2e" / "valid.txt").read_text().splitlines())
    )
    return [(i % num_prefixes, sources[i % len(sources)]) for i in range(num_requests)]


def prefix_lengths(num_prefixes: int) -> list[int]:
    return [4 + (i * 7) % 29 for i in range(num_prefixes)]  # 4..32 virtual tokens, all different-ish


def run_prefixserve(
    model_dir: Path, adapters: list[Path], jobs, new_tokens: int, device: str, workdir: Path
) -> tuple[float, list]:
    from serving import running_server, upload_peft

    args = ["--max-num-seqs", str(len(jobs)), "--device", device, "--log-level", "warning"]
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    with running_server(model_dir, str(workdir / "store"), workdir, args=args, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i, path in enumerate(adapters):
                response = upload_peft(client, f"bench/p{i}", path)
                response.raise_for_status()

        async def go() -> list[list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:

                async def one(prefix_index: int, prompt: str) -> list[int]:
                    body = {
                        "prefix": f"bench/p{prefix_index}",
                        "prompt": prompt,
                        "max_new_tokens": new_tokens,
                        "ignore_eos": True,
                    }
                    response = await client.post("/v1/generate", json=body)
                    response.raise_for_status()
                    return response.json()["token_ids"]

                await one(*jobs[0])  # warm-up: first forward, caches
                start = time.perf_counter()
                results = await asyncio.gather(*(one(*job) for job in jobs))
                return [time.perf_counter() - start, results]

        elapsed, results = asyncio.run(go())
    return elapsed, results


def run_peft(model_dir: Path, adapters: list[Path], jobs, new_tokens: int, device: str) -> tuple[float, list]:
    """What users do today: one PeftModel with every adapter loaded, set_adapter between requests."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapters[0], adapter_name="p0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"p{i}")
    model = model.to(device).eval()

    def one(prefix_index: int, prompt: str) -> list[int]:
        model.set_adapter(f"p{prefix_index}")
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out[0, enc["input_ids"].shape[1] :].tolist()

    one(*jobs[0])
    start = time.perf_counter()
    results = [one(*job) for job in jobs]
    return time.perf_counter() - start, results


def run_hf_batched(model_dir: Path, jobs, new_tokens: int, device: str) -> float:
    """The ceiling: the same prompts in one left-padded HF generate call, no prefixes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    enc = tokenizer([prompt for _, prompt in jobs], return_tensors="pt", padding=True).to(device)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.no_grad():
        model.generate(**{k: v[:2] for k, v in enc.items()}, **kwargs)
        start = time.perf_counter()
        model.generate(**enc, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--peft-requests",
        type=int,
        default=None,
        help="run PEFT on the first N requests only (slow backbones)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads for all three contenders (the server gets OMP_NUM_THREADS)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft_oracle import make_peft_adapter

    workdir = Path(tempfile.mkdtemp(prefix="prefixserve-bench-"))
    model_dir = build_backbone(workdir / "model", args.layers, args.width, args.heads, args.vocab)
    lengths = prefix_lengths(args.prefixes)
    adapters = [
        make_peft_adapter(model_dir, "gpt2", n, workdir / f"adapter{i}", seed=i)
        for i, n in enumerate(lengths)
    ]
    jobs = workload(args.requests, args.prefixes)
    peft_jobs = jobs[: args.peft_requests] if args.peft_requests else jobs
    n = args.new_tokens

    ps_time, ps_results = run_prefixserve(model_dir, adapters, jobs, n, args.device, workdir)
    peft_time, peft_results = run_peft(model_dir, adapters, peft_jobs, n, args.device)
    hf_time = run_hf_batched(model_dir, jobs, n, args.device)
    exact = sum(a == b for a, b in zip(ps_results, peft_results, strict=False))

    rows = {
        "prefixserve (HTTP, mixed prefixes)": len(jobs) * n / ps_time,
        "PEFT one at a time (set_adapter)": len(peft_jobs) * n / peft_time,
        "HF batched generate, no prefix": len(jobs) * n / hf_time,
    }
    print(
        f"\nGPT-2 {args.layers} layers x {args.width} wide, vocab {args.vocab}, {args.device}, torch threads "
        f"{torch.get_num_threads()}: {len(jobs)} requests over {args.prefixes} prefixes (P {min(lengths)}-{max(lengths)}), "
        f"{n} new tokens each"
    )
    for name, rate in rows.items():
        print(f"  {name:<38} {rate:10.1f} tokens/s")
    ratio_peft = rows["prefixserve (HTTP, mixed prefixes)"] / rows["PEFT one at a time (set_adapter)"]
    ratio_ceiling = rows["prefixserve (HTTP, mixed prefixes)"] / rows["HF batched generate, no prefix"]
    print(f"  prefixserve / PEFT one-at-a-time      {ratio_peft:10.2f}x")
    print(f"  prefixserve / no-prefix ceiling       {ratio_ceiling:10.2f}x")
    print(f"  greedy outputs identical to PEFT:     {exact}/{len(peft_results)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "tokens_per_s": rows,
                "ratio_vs_peft": ratio_peft,
                "ratio_vs_ceiling": ratio_ceiling,
                "identical": [exact, len(peft_results)],
                "device": args.device,
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
