"""Detokenisation cost per token: the byte-table path against the window path, on the demo tokenizer.

    .venv/bin/python -m bench.detokenize

Feeds real text (E2E references from ../shared/data, joined and tokenised by models/demo-gpt2's tokenizer) to
`IncrementalText` one token at a time, as the front does for a generation of 128, 512 and 2,000 tokens, with
no stop strings and with two, and prints microseconds per token for each path (one thread, best of 5). Checks
on the way that both paths give the same deltas.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalText, byte_table

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (128, 512, 2000)
STOPS = ("never said", "\n\n")


def per_token_us(tokenizer, table, ids: list[int], stop: tuple[str, ...]) -> tuple[float, list[str]]:
    best, deltas = float("inf"), []
    for _ in range(5):
        text = IncrementalText(tokenizer, stop, table)
        started = time.perf_counter()
        deltas = [text.add(i) for i in ids]
        best = min(best, time.perf_counter() - started)
    return best / len(ids) * 1e6, deltas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-gpt2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e" / "valid.txt")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    table = byte_table(tokenizer)
    assert table is not None, "the demo tokenizer is byte-level"
    print(f"byte table for {len(table)} tokens built and checked in {time.perf_counter() - started:.2f} s")
    references = [line.split("||", 1)[1] for line in args.data.read_text().splitlines() if "||" in line]
    ids = tokenizer(" ".join(references[:400]))["input_ids"]
    print(f"{'tokens':>6}  {'stops':>5}  {'table us/token':>14}  {'window us/token':>15}  {'ratio':>5}")
    for length in LENGTHS:
        for stop in ((), STOPS):
            fast, fast_deltas = per_token_us(tokenizer, table, ids[:length], stop)
            window, window_deltas = per_token_us(tokenizer, None, ids[:length], stop)
            assert fast_deltas == window_deltas
            print(f"{length:>6}  {len(stop):>5}  {fast:>14.2f}  {window:>15.2f}  {window / fast:>5.1f}")


if __name__ == "__main__":
    main()
