"""Score the demo prefixes through a real prefix-serve, greedy, on data held out from their training.

    .venv/bin/python scripts/eval_demo_served.py                      # models/demo-gpt2 + models/demo-prefixes
    .venv/bin/python scripts/eval_demo_served.py --model var/bb1/model --prefixes var/demo-prefixes/new

Starts `prefix-serve` on a free port with a fresh embedded store, uploads every <name>.safetensors of
--prefixes as the public prefix demo/<name>, then sends each held-out source to POST /v1/generate
(temperature 0, stop at EOS, at most --max-new-tokens) several at a time, and scores the answers:

- E2E: the 100 held-out MRs of trainer.data.e2e_split (the last 100 distinct MRs of e2e/valid.txt), corpus BLEU
  (sacrebleu) against all their references, with `demo/e2e` and with the bare backbone given the same prompt
  (the prefix's template filled by hand); and how often the output names the venue exactly as the MR does.
- WebNLG: the distinct triple sets of webnlg/dev (the 9 seen categories), BLEU with `demo/webnlg` and bare;
  and how often the first triple's subject appears in the output.
Those two splits were looked at while the demo's recipe was chosen (docs/quality.md). To score on a split nobody
tuned on, pass the official test sets: --e2e-file (E2E's `MR||reference` lines, e.g. the prefix-tuning
release's src1_test.txt) and --webnlg-dir (WebNLG XML). Writes a JSON report (figures and every output) to --out
and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# serving.py: the test suite's launcher (python -m server, waits for /readyz)
sys.path.insert(0, str(ROOT / "tests"))

from serving import running_server  # noqa: E402

from prefix_store.format import apply_template, load_prefix  # noqa: E402
from trainer.data import e2e_split, group_references, read_source_target, read_webnlg  # noqa: E402
from trainer.evaluate import corpus_bleu  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def generate(
    client: httpx.Client, prefix: str | None, prompt: str, max_new_tokens: int, num_beams: int = 1
) -> str:
    body = {"prefix": prefix, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0}
    if num_beams > 1:
        body["num_beams"] = num_beams
    response = client.post("/v1/generate", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["text"].strip()


def run_all(
    client: httpx.Client, prefix: str | None, prompts: list[str], args: argparse.Namespace
) -> list[str]:
    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(
            pool.map(lambda p: generate(client, prefix, p, args.max_new_tokens, args.num_beams), prompts)
        )


def e2e_name(source: str) -> str:
    fields = dict(part.split(" : ", 1) for part in source.split(" | "))
    return fields.get("name", "").strip()


def score_task(client, task: str, sources, references, template: str, args, named) -> dict:
    outputs = run_all(client, f"demo/{task}", sources, args)
    bare = run_all(client, None, [apply_template(template, s) for s in sources], args)
    result = {"sources": len(sources), "bleu": corpus_bleu(outputs, references),
              "bare_bleu": corpus_bleu(bare, references),
              "named": sum(named(s, o) for s, o in zip(sources, outputs, strict=True)) / len(sources),
              "bare_named": sum(named(s, o) for s, o in zip(sources, bare, strict=True)) / len(sources),
              "outputs": [{"source": s, "prefix": o, "bare": b} for s, o, b in zip(sources, outputs, bare, strict=True)]}  # fmt: skip
    print(f"{task}: BLEU {result['bleu']:.2f} (bare backbone, same template: {result['bare_bleu']:.2f}) on "
          f"{len(sources)} sources; named {100 * result['named']:.0f}% (bare {100 * result['bare_named']:.0f}%)",
          flush=True)  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo-gpt2")
    p.add_argument("--prefixes", type=Path, default=ROOT / "models" / "demo-prefixes")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "served-eval" / "report.json")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--webnlg-sources", type=int, help="first N distinct triple sets of webnlg/dev (default: all)"
    )
    p.add_argument("--only", choices=["e2e", "webnlg"])
    p.add_argument(
        "--e2e-file", type=Path, help="score every MR of this E2E file instead of the held-out split"
    )
    p.add_argument("--webnlg-dir", type=Path, default=DATA / "webnlg" / "dev", help="WebNLG XML to score")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy)")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": str(args.model), "prefixes": str(args.prefixes), "greedy": True,
                    "max_new_tokens": args.max_new_tokens, "e2e_file": str(args.e2e_file or "held-out split"),
                    "webnlg_dir": str(args.webnlg_dir)}  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as store,
        running_server(args.model.resolve(), store, args.out.parent / "server-logs") as server,
    ):
        client = httpx.Client(base_url=server.url)
        tasks = [args.only] if args.only else ["e2e", "webnlg"]
        for task in tasks:
            data = (args.prefixes / f"{task}.safetensors").read_bytes()
            put = client.put(f"/v1/prefixes/demo/{task}", content=data, params={"public": "true"},
                             headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            put.raise_for_status()
            template = load_prefix(data).prompt_template
            started = time.time()
            if task == "e2e":
                if args.e2e_file:  # a whole file nobody trained on, e.g. the official test set
                    heldout = read_source_target(args.e2e_file)
                else:
                    _, heldout = e2e_split(read_source_target(DATA / "e2e" / "valid.txt"))
                sources, references = group_references(heldout)
                report["e2e"] = score_task(client, "e2e", sources, references, template, args,
                                           lambda s, o: e2e_name(s) in o)  # fmt: skip
            else:
                sources, references = group_references(read_webnlg(args.webnlg_dir))
                sources, references = sources[: args.webnlg_sources], references[: args.webnlg_sources]
                report["webnlg"] = score_task(client, "webnlg", sources, references, template, args,
                                              lambda s, o: s.split(" : ", 1)[0] in o)  # fmt: skip
            report[task]["minutes"] = (time.time() - started) / 60
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
