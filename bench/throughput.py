"""Side by side on one workload: prefixserve over HTTP vs PEFT one request at a time vs HF batched, no prefix.

    .venv/bin/python -m bench.throughput --threads 1          # GPT-2, 4 layers, width 256, 32 requests, 16 prefixes
    .venv/bin/python -m bench.throughput --layers 24 --width 1024 --heads 16 --prefixes 64 --requests 128 --device cuda
    .venv/bin/python -m bench.throughput --family llama --layers 8 --width 512 --heads 8 --kv-heads 2 \
        --vocab 32000 --threads 1 --name throughput-llama                  # a Llama-shaped backbone (GQA)

The backbone is built here with random weights and a BPE tokenizer trained on ../shared/data (nothing is
downloaded); the prefixes are PEFT prefix-tuning adapters of different lengths, uploaded to prefixserve
as PEFT multipart. One rule for all three: greedy, up to --new-tokens tokens, a request ends at EOS (nobody
ignores or suppresses it), and throughput counts the tokens each contender actually returned. Each contender
is warmed up the same way (the first --warmup requests, untimed, in its own mode) and timed --repeats times;
the figures are the median and the range. prefixserve's greedy tokens must equal PEFT's for every request PEFT
ran, or the benchmark fails. Figures go to bench/results/<--name>.json (python -m bench.report renders them
into bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
# the data sets beside the checkout; PREFIXSERVE_BENCH_DATA for a checkout elsewhere (a git worktree)
DATA = Path(os.environ.get("PREFIXSERVE_BENCH_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "tests"))

from bench.record import spread, write_result  # noqa: E402


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


def build_llama_backbone(path: Path, layers: int, width: int, heads: int, kv_heads: int, vocab: int) -> Path:
    """A random LlamaForCausalLM (grouped-query attention, SwiGLU, untied) with a BPE tokenizer that adds BOS
    as Llama tokenizers do; filler tokens bring the vocabulary to `vocab` when the data holds fewer merges."""
    from tiny_models import build_chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    lines = (DATA / "wikitext2" / "valid.txt").read_text().splitlines()
    lines += [line.split("||")[0] for line in (DATA / "e2e" / "valid.txt").read_text().splitlines()]
    tokenizer = build_chat_tokenizer(path, lines, vocab)
    tokenizer.add_tokens([f"<filler_{i}>" for i in range(vocab - len(tokenizer))])
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=-(-width * 8 // 3 // 64) * 64,  # Llama's 8/3 x width, to a multiple of 64
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def add_backbone_args(parser: argparse.ArgumentParser, vocab: int = 8000) -> None:
    """--layers/--width/--heads/--vocab: the random GPT-2 that `build_backbone` makes (every bench takes them)."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=vocab)


def workload(num_requests: int, num_prefixes: int) -> list[tuple[int, str]]:
    """(prefix index, prompt): E2E meaning representations, prefixes round-robin."""
    sources = list(
        dict.fromkeys(line.split("||")[0] for line in (DATA / "e2e" / "valid.txt").read_text().splitlines())
    )
    return [(i % num_prefixes, sources[i % len(sources)]) for i in range(num_requests)]


def prefix_lengths(num_prefixes: int) -> list[int]:
    return [4 + (i * 7) % 29 for i in range(num_prefixes)]  # 4..32 virtual tokens, all different-ish


Job = tuple[int, str]  # (prefix index, prompt)


def timed(run: Callable[[list[Job]], list[list[int]]], jobs: list[Job], warmup: int, repeats: int):
    """Warm up on the first `warmup` jobs (untimed), then time `repeats` runs of all of them.
    Returns (seconds per run, tokens returned per run, the last run's token ids)."""
    run(jobs[:warmup])
    seconds, tokens, results = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = run(jobs)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(ids) for ids in results))
    return seconds, tokens, results


def until_eos(ids: list[int], eos: int) -> list[int]:
    """Generated ids as prefixserve reports them: up to (without) the first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids


def run_prefixserve(model_dir: Path, adapters: list[Path], jobs: list[Job], args, workdir: Path):
    from serving import running_server, upload_peft

    server_args = ["--max-num-seqs", str(len(jobs)), "--device", args.device, "--log-level", "warning"]
    server_args += ["--dtype", "float32"]  # what PEFT and HF run in (and `auto` is bfloat16 on CUDA)
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    with running_server(model_dir, str(workdir / "store"), workdir, args=server_args, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i, path in enumerate(adapters):
                upload_peft(client, f"bench/p{i}", path).raise_for_status()

        async def go(batch: list[Job]) -> list[list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:

                async def one(prefix_index: int, prompt: str) -> list[int]:
                    body = {
                        "prefix": f"bench/p{prefix_index}",
                        "prompt": prompt,
                        "max_new_tokens": args.new_tokens,
                    }
                    response = await client.post("/v1/generate", json=body)
                    response.raise_for_status()
                    return response.json()["token_ids"]

                return list(await asyncio.gather(*(one(*job) for job in batch)))

        return timed(lambda batch: asyncio.run(go(batch)), jobs, args.warmup, args.repeats)


def run_peft(model_dir: Path, adapters: list[Path], jobs: list[Job], args):
    """What users do today: one PeftModel with every adapter loaded, set_adapter between requests."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapters[0], adapter_name="p0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"p{i}")
    model = model.to(args.device).eval()
    eos = tokenizer.eos_token_id

    def one(prefix_index: int, prompt: str) -> list[int]:
        model.set_adapter(f"p{prefix_index}")
        enc = tokenizer(prompt, return_tensors="pt").to(args.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=eos)
        return until_eos(out[0, enc["input_ids"].shape[1] :].tolist(), eos)

    return timed(lambda batch: [one(*job) for job in batch], jobs, args.warmup, args.repeats)


def run_hf_batched(model_dir: Path, jobs: list[Job], args):
    """The ceiling: the same prompts in one left-padded HF generate call, no prefixes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device).eval()
    eos = tokenizer.eos_token_id

    def batch_generate(batch: list[Job]) -> list[list[int]]:
        enc = tokenizer([prompt for _, prompt in batch], return_tensors="pt", padding=True).to(args.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=eos)
        return [until_eos(row, eos) for row in out[:, enc["input_ids"].shape[1] :].tolist()]

    return timed(batch_generate, jobs, args.warmup, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backbone_args(parser)
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2", help="the backbone's shape")
    parser.add_argument("--kv-heads", type=int, default=2, help="llama: key/value heads (grouped-query)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="at most; a request ends at EOS")
    parser.add_argument(
        "--peft-requests",
        type=int,
        default=None,
        help="run PEFT on the first N requests only (slow backbones)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per contender first")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads for all three contenders (the server gets OMP_NUM_THREADS)",
    )
    parser.add_argument("--name", default="throughput", help="results file: bench/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft_oracle import make_peft_adapter

    workdir = Path(tempfile.mkdtemp(prefix="prefixserve-bench-"))
    if args.family == "llama":
        shape = (args.layers, args.width, args.heads, args.kv_heads, args.vocab)
        model_dir = build_llama_backbone(workdir / "model", *shape)
    else:
        model_dir = build_backbone(workdir / "model", args.layers, args.width, args.heads, args.vocab)
    lengths = prefix_lengths(args.prefixes)
    adapters = [
        make_peft_adapter(model_dir, args.family, n, workdir / f"adapter{i}", seed=i)
        for i, n in enumerate(lengths)
    ]
    jobs = workload(args.requests, args.prefixes)
    peft_jobs = jobs[: args.peft_requests] if args.peft_requests else jobs

    contenders = {
        "prefixserve": run_prefixserve(model_dir, adapters, jobs, args, workdir),
        "peft": run_peft(model_dir, adapters, peft_jobs, args),
        "hf_batched": run_hf_batched(model_dir, jobs, args),
    }
    ps_results, peft_results = contenders["prefixserve"][2], contenders["peft"][2]
    mismatches = [i for i, (a, b) in enumerate(zip(ps_results, peft_results, strict=False)) if a != b]

    rates = {
        name: [tokens / seconds for seconds, tokens in zip(run[0], run[1], strict=True)]
        for name, run in contenders.items()
    }
    medians = {name: statistics.median(r) for name, r in rates.items()}
    labels = {
        "prefixserve": "prefixserve (HTTP, mixed prefixes)",
        "peft": "PEFT one at a time (set_adapter)",
        "hf_batched": "HF batched generate, no prefix",
    }
    shape = (
        "GPT-2" if args.family == "gpt2" else f"Llama ({args.heads} heads, {args.kv_heads} key/value heads)"
    )
    print(
        f"\n{shape} {args.layers} layers x {args.width} wide, vocab {args.vocab}, {args.device}, torch threads "
        f"{torch.get_num_threads()}: {len(jobs)} requests over {args.prefixes} prefixes (P {min(lengths)}-{max(lengths)}), "
        f"up to {args.new_tokens} new tokens each, {args.repeats} timed runs"
    )
    for name, label in labels.items():
        r = rates[name]
        print(f"  {label:<38} {medians[name]:10.1f} tokens/s  (range {min(r):.1f}-{max(r):.1f})")
    print(f"  prefixserve / PEFT one-at-a-time      {medians['prefixserve'] / medians['peft']:10.2f}x")
    print(f"  prefixserve / no-prefix ceiling       {medians['prefixserve'] / medians['hf_batched']:10.2f}x")
    identical = len(peft_results) - len(mismatches)
    print(f"  greedy outputs identical to PEFT:     {identical}/{len(peft_results)}")
    figures = {
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": args.vocab}
        | ({"family": "llama", "kv_heads": args.kv_heads} if args.family == "llama" else {}),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "requests": len(jobs),
        "peft_requests": len(peft_jobs),
        "prefixes": args.prefixes,
        "prefix_lengths": [min(lengths), max(lengths)],
        "max_new_tokens": args.new_tokens,
        "tokens_returned": {name: run[1] for name, run in contenders.items()},
        "tokens_per_s": {name: spread(r) for name, r in rates.items()},
        "ratio_vs_peft": medians["prefixserve"] / medians["peft"],
        "ratio_vs_ceiling": medians["prefixserve"] / medians["hf_batched"],
        "identical_to_peft": [identical, len(peft_results)],
    }
    if mismatches:  # the figures are printed (to see what differs), not recorded
        raise SystemExit(f"prefixserve's greedy tokens differ from PEFT's for requests {mismatches}")
    write_result(args.name, "bench.throughput", figures)


if __name__ == "__main__":
    main()
