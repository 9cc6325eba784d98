"""Train the two demo prefixes shipped in models/demo-prefixes/ with `prefix-train` on the demo backbone.

    nohup .venv/bin/python scripts/train_demo_prefixes.py > var/demo-prefixes/log.txt 2>&1 &

- e2e.safetensors:    E2E, trained on the project's training part of e2e/valid.txt (447 MRs); BLEU on the first
                      50 of the 100 held-out MRs (trainer.data.e2e_split).
- webnlg.safetensors: WebNLG 2017 train (source = `subject : relation : object` triples joined by ` | `);
                      BLEU on the first 50 distinct triple sets of webnlg/dev.
The split files are written to var/demo-prefixes/ and the exact prefix-train command lines are printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.train_demo_backbone import invented_name  # noqa: E402
from trainer.cli import main as prefix_train  # noqa: E402
from trainer.data import Example, e2e_split, group_references, read_source_target, read_webnlg  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples))
    return path


def varied_name(rng: random.Random) -> str:
    """An invented venue name of one to three words, "The ..." half the time: real venue names have up to
    three words, and `name` and `near` both starting with "The" is the case where copying the wrong one is
    easiest (invented_name's defaults, the backbone corpus's, give at most two words and "The" in 30 %)."""
    return invented_name(rng, word_counts=(1, 2, 2, 3), the_share=0.5)


@functools.cache
def name_words() -> tuple[str, ...]:
    """Capitalised English words for venue names: the alphabetic words of 3-9 letters seen at least 5 times in
    WikiText-2 (valid), minus every word of the held-out MRs' `name` and `near` values (they must stay unseen)."""
    text = (DATA / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    counts = Counter(w.lower() for w in re.findall(r"\b[A-Za-z]{3,9}\b", text))
    unseen = {word for venue in heldout_venues() for word in re.findall(r"[a-z]+", venue)}
    return tuple(sorted(w.capitalize() for w, n in counts.items() if n >= 5 and w not in unseen))


def word_name(rng: random.Random) -> str:
    """A venue name of one to three English words (name_words), a one-word name joined from two words a third
    of the time ("Stonebridge"), "The ..." 40 % of the time: real venue names are made of words, which the
    backbone tokenises unlike invented syllables, and a prefix trained only on invented names learns to copy
    those (seen: held-out "Wildwood" written as "A coffee shop ..." on a backbone that copies invented names)."""
    words = name_words()
    parts = [rng.choice(words) for _ in range(rng.choice((1, 1, 2, 2, 3)))]
    if len(parts) == 1 and rng.random() < 1 / 3:
        parts = [parts[0] + rng.choice(words).lower()]
    name = ("The " if rng.random() < 0.4 else "") + " ".join(parts)
    return word_name(rng) if name.lower() in heldout_venues() else name


@functools.cache
def heldout_venues() -> frozenset[str]:
    """The held-out MRs' `name` and `near` values, lower-cased."""
    _, heldout = e2e_split(read_source_target(DATA / "e2e" / "valid.txt"))
    return frozenset(
        value.lower() for ex in heldout for key, value in mr_fields(ex.source) if key in ("name", "near")
    )


def mr_fields(source: str) -> list[tuple[str, str]]:
    """An E2E meaning representation `key : value | ...` as (key, value) pairs."""
    return [(key, value) for key, _, value in (part.partition(" : ") for part in source.split(" | "))]


NAME_STYLES = {"backbone": invented_name, "varied": varied_name, "words": word_name}


def rename_venues(
    examples: list[Example], fraction: float, seed: int = 0, style: str = "backbone"
) -> list[Example]:
    """Replace the `name` and `near` venues of a share of the E2E training pairs (in the MR and in the text) by
    invented names (NAME_STYLES[style]). The training part has few venues, so a prefix can get by memorising
    them; the held-out MRs are about other venues, which only copying from the MR gets right. Renaming makes
    copying pay in training."""
    invent = NAME_STYLES[style]
    rng = random.Random(seed)
    out = []
    for ex in examples:
        source, target = ex.source, ex.target
        if rng.random() < fraction:
            for key, value in mr_fields(ex.source):
                if key in ("name", "near") and value:
                    new = invent(rng)
                    source, target = source.replace(value, new), target.replace(value, new)
        out.append(Example(source, target))
    return out


def entity_name(rng: random.Random) -> str:
    """An invented WebNLG entity: one to three capitalised English words (name_words)."""
    return " ".join(rng.choice(name_words()) for _ in range(rng.choice((1, 2, 2, 3))))


def rename_entities(examples: list[Example], fraction: float, seed: int = 0) -> list[Example]:
    """Replace, in a share of the WebNLG training pairs, every subject and object that the text spells exactly
    as the triples do (and that has a letter in it: numbers and dates stay) by an invented entity (entity_name),
    in the triples and in the text alike, longest first, whole words only.

    Why: the backbone's corpus holds the WebNLG training texts, so a prefix trained on them can lower its loss by
    recalling the memorised sentence (and does: "Elliot See was born in Dallas, Texas" for triples that say
    nothing of Dallas); held-out triple sets are new combinations, which only reading the triples gets right.
    With invented entities the memory does not help and copying from the triples pays, as for E2E's venues."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        if rng.random() >= fraction:
            out.append(ex)
            continue
        entities = set()
        for triple in ex.source.split(" | "):
            parts = triple.split(" : ")
            if len(parts) == 3:
                entities.update(part.strip().strip('"').strip() for part in (parts[0], parts[2]))
        patterns = [_whole(e) for e in sorted(entities, key=len, reverse=True) if re.search(r"[A-Za-z]", e)]
        source, target = ex.source, ex.target
        for pattern in (p for p in patterns if p.search(ex.target)):
            new = entity_name(rng)
            source = pattern.sub(lambda _m, new=new: new, source)
            target = pattern.sub(lambda _m, new=new: new, target)
        out.append(Example(source, target))
    return out


def longest_references(examples: list[Example], keep: str) -> list[Example]:
    """WebNLG: per triple set, only its longest lexicalisations (`keep="longest"`: the most words, ties kept) or
    those at least as long as the set's median (`"longer"`). Greedy outputs of the demo prefix are too short
    (BLEU's brevity penalty 0.79: three to five triples get a sentence about one or two of them)."""
    lengths = {
        source: [len(r.split()) for r in refs]
        for source, refs in zip(*group_references(examples), strict=True)
    }
    if keep == "longest":
        bar = {source: max(n) for source, n in lengths.items()}
    else:
        bar = {source: sorted(n)[(len(n) - 1) // 2] for source, n in lengths.items()}
    return [ex for ex in examples if len(ex.target.split()) >= bar[ex.source]]


def _whole(text: str) -> re.Pattern[str]:
    """`text` as whole words (not inside a longer word)."""
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")


def run(args: list[str]) -> None:
    print("prefix-train " + " ".join(shlex.quote(a) for a in args), flush=True)
    prefix_train(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "demo-gpt2"))
    p.add_argument("--out", type=Path, default=ROOT / "models" / "demo-prefixes")
    p.add_argument("--work", type=Path, default=ROOT / "var" / "demo-prefixes")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", default="5e-3")
    p.add_argument("--init-text", default="table-to-text:",
                   help="initialise the prefix from this text's activations ('' for a random start)")  # fmt: skip
    p.add_argument("--only", choices=["e2e", "webnlg"])
    p.add_argument("--rename-frac", type=float, default=0.5,
                   help="E2E: share of training pairs whose venues get invented names (see rename_venues)")  # fmt: skip
    p.add_argument("--name-style", choices=sorted(NAME_STYLES), default="words",
                   help="E2E: how renamed venues are invented (see word_name, invented_name, varied_name)")  # fmt: skip
    p.add_argument("--entity-rename-frac", type=float, default=0.0,
                   help="WebNLG: share of training pairs whose entities get invented names (see rename_entities)")  # fmt: skip
    p.add_argument("--webnlg-references", choices=["all", "longer", "longest"], default="all",
                   help="WebNLG: train on every lexicalisation, or per triple set only the longer ones (see longest_references)")  # fmt: skip
    p.add_argument("--prefix-length", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --work (e.g. with a larger --steps)")  # fmt: skip
    args = p.parse_args()
    common = ["--model", args.model, "--prefix-length", str(args.prefix_length), "--lr", args.lr, "--batch-size", "10",
              "--max-steps", str(args.steps), "--warmup-steps", "30", "--eval-max-sources", "50",
              "--threads", "1", "--max-new-tokens", "80", "--quiet", "--device", args.device]  # fmt: skip
    if args.init_text:
        common += ["--init-text", args.init_text]
    if args.resume:
        common += ["--resume"]
    if args.only in (None, "e2e"):
        train, heldout = e2e_split(read_source_target(DATA / "e2e" / "valid.txt"))
        train = rename_venues(train, args.rename_frac, style=args.name_style)
        run(["--train", str(write_jsonl(args.work / "e2e-train.jsonl", train)),
             "--dev", str(write_jsonl(args.work / "e2e-heldout.jsonl", heldout)),
             "--output", str(args.out / "e2e.safetensors"),
             "--checkpoint", str(args.work / "e2e.checkpoint.pt"), *common])  # fmt: skip
    if args.only in (None, "webnlg"):
        train = str(DATA / "webnlg" / "train")
        if args.entity_rename_frac > 0 or args.webnlg_references != "all":
            pairs = read_webnlg(DATA / "webnlg" / "train")
            if args.webnlg_references != "all":
                pairs = longest_references(pairs, args.webnlg_references)
            pairs = rename_entities(pairs, args.entity_rename_frac)
            train = str(write_jsonl(args.work / "webnlg-train.jsonl", pairs))
        run(["--train", train, "--dev", str(DATA / "webnlg" / "dev"),
             "--output", str(args.out / "webnlg.safetensors"),
             "--checkpoint", str(args.work / "webnlg.checkpoint.pt"), *common])  # fmt: skip


if __name__ == "__main__":
    main()
