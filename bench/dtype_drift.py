"""bfloat16 (and float16) against float32 on one device: how often greedy tokens differ, and from which step.

    .venv/bin/python -m bench.dtype_drift --requests 20          # CPU, a quick look
    python -m bench.dtype_drift --device cuda                    # the figures in bench/README.md, "On a GPU"

Exactness (tokens equal to PEFT's) is promised in float32; `--dtype auto` picks bfloat16 on CUDA. This measures
what that costs on the shipped demo backbone (models/demo-gpt2) with its demo prefixes, on held-out prompts
nobody trained on: the last 100 E2E MRs (trainer.data.e2e_split) with `demo/e2e`, the first WebNLG dev triple
sets with `demo/webnlg`, and the E2E prompts on the bare backbone. Each dtype runs the same requests through
the engine in-process (mixed prefixes in one batch, greedy, up to --new-tokens, EOS ends a request); every
request is compared with float32's: identical or not, and the first step (0-based) where the tokens differ.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def jobs(num: int) -> list[tuple[str, str | None, str]]:
    """(group, prefix file or None, prompt) for up to `num` prompts per group."""
    from prefix_store.format import apply_template, load_prefix
    from trainer.data import e2e_split, group_references, read_source_target, read_webnlg

    prefixes = ROOT / "models" / "demo-prefixes"
    e2e_template = load_prefix((prefixes / "e2e.safetensors").read_bytes()).prompt_template
    web_template = load_prefix((prefixes / "webnlg.safetensors").read_bytes()).prompt_template
    _, heldout = e2e_split(read_source_target(DATA / "e2e" / "valid.txt"))
    e2e_sources = list(dict.fromkeys(example.source for example in heldout))[:num]
    web_sources, _ = group_references(read_webnlg(DATA / "webnlg" / "dev"))
    out = [("e2e + demo/e2e", "e2e", apply_template(e2e_template, s)) for s in e2e_sources]
    out += [("webnlg + demo/webnlg", "webnlg", apply_template(web_template, s)) for s in web_sources[:num]]
    out += [("e2e, bare backbone", None, apply_template(e2e_template, s)) for s in e2e_sources]
    return out


def generate(
    model: Path, device: str, dtype: str, work, new_tokens: int, max_num_seqs: int
) -> list[list[int]]:
    from prefix_store.cache import DevicePrefix
    from prefix_store.format import load_prefix, save_prefix
    from prefix_store.store import make_meta
    from server.engine.backbone import load_backbone
    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import SamplingParams

    backbone = load_backbone(model, device, dtype)
    prefixes = {}
    for name in {p for _, p, _ in work if p is not None}:
        prefix = load_prefix((ROOT / "models" / "demo-prefixes" / f"{name}.safetensors").read_bytes())
        meta = make_meta(f"demo/{name}", prefix, save_prefix(prefix), "native", False)
        targets = {k: v.to(device=backbone.device, dtype=backbone.dtype) for k, v in prefix.targets.items()}
        prefixes[name] = DevicePrefix(meta=meta, targets=targets, num_bytes=prefix.num_bytes)
    engine = Engine(backbone, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=1024))

    async def one(prefix_name: str | None, prompt: str) -> list[int]:
        prefix = prefixes.get(prefix_name) if prefix_name else None
        request = engine.add(
            engine.tokenize(prompt), SamplingParams(max_new_tokens=new_tokens), prefix, prefix and prefix.id
        )
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    async def everything() -> list[list[int]]:
        return await asyncio.gather(*(one(p, prompt) for _, p, prompt in work))

    engine.start()
    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return step
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="compared with float32, comma-separated")
    parser.add_argument("--requests", type=int, default=100, help="prompts per group (3 groups)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    work = jobs(args.requests)
    reference = generate(args.model, args.device, "float32", work, args.new_tokens, args.max_num_seqs)
    again = generate(args.model, args.device, "float32", work, args.new_tokens, args.max_num_seqs)
    same = sum(a == b for a, b in zip(reference, again, strict=True))
    print(f"float32 twice on {args.device}: {same}/{len(work)} identical")
    groups = list(dict.fromkeys(g for g, _, _ in work))
    print(
        f"\n| {args.device}, vs float32 | group | identical | first differing step: min / median | tokens |"
    )
    print("|---|---|---:|---|---:|")
    for dtype in args.dtypes.split(","):
        got = generate(args.model, args.device, dtype, work, args.new_tokens, args.max_num_seqs)
        for group in groups:
            pairs = [(r, g) for (grp, _, _), r, g in zip(work, reference, got, strict=True) if grp == group]
            steps = [s for s in (first_difference(r, g) for r, g in pairs) if s is not None]
            same = len(pairs) - len(steps)
            where = f"{min(steps)} / {statistics.median(steps):g}" if steps else "—"
            tokens = sum(len(r) for r, _ in pairs)
            print(f"| {dtype} | {group} | {same}/{len(pairs)} | {where} | {tokens} |")


if __name__ == "__main__":
    main()
