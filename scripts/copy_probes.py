"""Copy probes for a causal LM: can it copy from its context? (docs/quality.md reports them beside perplexity.)

    .venv/bin/python scripts/copy_probes.py models/demo-gpt2

- `repeat`: a random sequence of 30 tokens, then the same 30 tokens again (behind an EOS); the greedy
  next-token accuracy on tokens 2..30 of the second copy (the first one cannot be predicted). Chance is 1/V;
  a model with an induction head gets close to 1.
- `name-rest`: an invented name (never in the training corpus) is introduced, then its first token is given
  again; the greedy accuracy on the name's remaining tokens ("... Vorlin Dask is a pub ... We went to Vorlin"
  -> " Dask").
- `name-recall`: the same context, cued by a phrase that the name followed before ("The Vorlin Dask is a
  pub. ... I walked to The" -> " Vorlin"): how often the greedy next token is the name's first token.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch

SYLLABLES = ["vor", "lin", "dask", "quel", "mor", "thi", "zan", "bek", "rul", "oph", "kir", "tav", "sel",
             "gro", "wyn", "pax", "dru", "mel", "fen", "yor", "glim", "tosk", "brae", "cul"]  # fmt: skip
TEMPLATES = [  # (context with {name}, cue after which the name should come again)
    ("The {name} is a pub near the river. It serves cheap Italian food and is family friendly. "
     "Last week I walked to The", ""),
    ("{name} is a coffee shop in the city centre with a high customer rating. Near the market, "
     "the best coffee is at", ""),
    ("My neighbour is called {name}. Every morning, I say hello to", ""),
    ("{name} was born in 1932 and became a famous painter. Many museums show the work of", ""),
]  # fmt: skip


def invented_names(count: int, seed: int, forbidden: str = "") -> list[str]:
    """Two capitalised invented words each, none of them in `forbidden` (e.g. the training corpus)."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < count:
        words = ["".join(rng.sample(SYLLABLES, rng.choice([2, 2, 3]))).capitalize() for _ in range(2)]
        name = " ".join(words)
        if all(w not in forbidden for w in words) and name not in names:
            names.append(name)
    return names


@torch.no_grad()
def repeat_accuracy(
    model, vocab_size: int, eos_id: int, length: int = 30, count: int = 40, seed: int = 0
) -> float:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, vocab_size, (count, length), generator=g)
    first[first == eos_id] = 1
    ids = torch.cat([torch.full((count, 1), eos_id), first, first], dim=1)
    predicted = (
        model(input_ids=ids.to(model.device)).logits.argmax(-1).cpu()
    )  # predicted[:, t] is the guess for ids[:, t + 1]
    # second copy occupies ids[:, 1 + length : 1 + 2 * length]; skip its first token
    guesses = predicted[:, length + 1 : 2 * length]
    return (guesses == ids[:, length + 2 : 2 * length + 1]).float().mean().item()


@torch.no_grad()
def name_probes(model, tokenizer, names: list[str]) -> dict[str, float]:
    rest_hits = rest_total = recall_hits = recall_total = 0
    recall_prob = 0.0
    for i, name in enumerate(names):
        context, _ = TEMPLATES[i % len(TEMPLATES)]
        text = context.format(name=name)
        prompt = tokenizer(" " + text)["input_ids"]
        name_ids = tokenizer(" " + name)["input_ids"]
        # recall: after the cue, is the next token the name's first token?
        logits = model(input_ids=torch.tensor([prompt], device=model.device)).logits[0, -1]
        recall_hits += int(logits.argmax().item() == name_ids[0])
        recall_prob += logits.softmax(-1)[name_ids[0]].item()
        recall_total += 1
        # rest: given the name's first token again, the remaining tokens (teacher forced)
        ids = torch.tensor([prompt + name_ids], device=model.device)
        predicted = model(input_ids=ids).logits[0].argmax(-1).tolist()
        start = len(prompt)  # ids[start] = first name token; predicted[start + k - 1] guesses ids[start + k]
        for k in range(1, len(name_ids)):
            rest_hits += int(predicted[start + k - 1] == name_ids[k])
            rest_total += 1
    return {"name_rest": rest_hits / max(rest_total, 1), "name_recall": recall_hits / recall_total,
            "name_recall_prob": recall_prob / recall_total}  # fmt: skip


def run_probes(model, tokenizer, forbidden: str = "", count: int = 40) -> dict[str, float]:
    was_training = model.training
    model.eval()
    result = {"repeat": repeat_accuracy(model, len(tokenizer), tokenizer.eos_token_id, count=count)}
    result.update(name_probes(model, tokenizer, invented_names(count, seed=1, forbidden=forbidden)))
    model.train(was_training)
    return {k: round(v, 3) for k, v in result.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--count", type=int, default=40)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(json.dumps(run_probes(model, tokenizer, count=args.count)))


if __name__ == "__main__":
    sys.exit(main())
