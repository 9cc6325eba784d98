"""Pretrain the demo backbone shipped at models/demo-gpt2: a small GPT-2 and its byte-level BPE tokenizer,
trained from scratch on ../shared/data only (recipe and figures: docs/demo.md).

Corpus: WikiText-2 valid+test (general English), the E2E references of the *training* part of
e2e/valid.txt (the held-out MRs used by docs/quality.md are left out) and the WebNLG train lexicalisations.
Only natural text goes into the language model; the MRs and triples go only into the tokenizer, so that
reading a table is what the prefixes learn.

    nohup .venv/bin/python scripts/train_demo_backbone.py > var/demo-backbone/log.txt 2>&1 &

Single CPU thread by default (shared machine). The learning-rate schedule follows the *larger* of step
progress and wall-clock progress, so a run always ends, fully decayed, within --max-minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.copy_probes import run_probes  # noqa: E402
from scripts.plant_copy import plant_induction  # noqa: E402
from trainer.data import e2e_split, group_references, read_source_target, read_webnlg  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
EOS = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "models" / "demo-gpt2")
    p.add_argument("--work", type=Path, default=ROOT / "var" / "demo-backbone")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block", type=int, default=256, help="training sequence length = n_positions")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=33.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-by-source", action="store_true",
                   help="one document per MR / triple set (all its references) instead of one per reference")  # fmt: skip
    p.add_argument(
        "--init-from", type=Path, help="continue from a saved model dir (its tokenizer and weights)"
    )
    p.add_argument(
        "--tokenizer", type=Path, help="reuse the tokenizer of this model dir instead of training one"
    )
    p.add_argument("--no-plant", action="store_true",
                   help="plain random initialisation (default: plant a copy circuit, scripts/plant_copy.py)")  # fmt: skip
    p.add_argument("--synthetic-frac", type=float, default=0.12,
                   help="extra blocks of repeated random-token spans, as a fraction of the text blocks")  # fmt: skip
    p.add_argument("--rename-frac", type=float, default=0.5,
                   help="share of E2E documents whose venue name is replaced by an invented one")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="residual/embedding/attention dropout while training (saved config: 0)")  # fmt: skip
    p.add_argument("--probe-every", type=int, default=50, help="steps between copy probes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU: docs/demo.md)")
    p.add_argument("--keep-best", action="store_true",
                   help="ship the weights with the lowest loss on the held-out blocks (checked at each probe), "
                        "not the last ones: for runs long enough to overfit the small corpus")  # fmt: skip
    p.add_argument("--min-name-rest", type=float, default=0.0,
                   help="with --keep-best: only weights whose name_rest probe is at least this are candidates "
                        "(a long run can trade the copy of unseen names for held-out loss)")  # fmt: skip
    p.add_argument("--redraw-every-epoch", action="store_true",
                   help="invent the renamed venues and the synthetic repeats afresh every epoch, so that "
                        "copying them keeps paying instead of memorising them")  # fmt: skip
    return p.parse_args()


TRAIN_SYLLABLES = ["ar", "bel", "cor", "dun", "el", "far", "gin", "hal", "ist", "jor", "kal", "lem", "nor",
                   "pen", "ros", "sut", "tam", "ulf", "ven", "wil"]  # fmt: skip


def invented_name(
    rng: random.Random, word_counts: tuple[int, ...] = (1, 2, 2), the_share: float = 0.3
) -> str:
    """A name of invented words (2-3 syllables each), as many words as a draw from `word_counts`, "The ..."
    with probability `the_share`."""
    words = [
        "".join(rng.sample(TRAIN_SYLLABLES, rng.choice([2, 3]))).capitalize()
        for _ in range(rng.choice(word_counts))
    ]
    return ("The " if rng.random() < the_share else "") + " ".join(words)


def corpus(
    data: Path, group_by_source: bool, rename_frac: float = 0.0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(documents for the language model, extra lines for the tokenizer only)."""
    docs: list[str] = []
    for name in ("valid.txt", "test.txt"):
        article: list[str] = []
        for line in (data / "wikitext2" / name).read_text(encoding="utf-8").splitlines():
            is_title = line.startswith(" = ") and not line.startswith(" = = ")
            if is_title and article:
                docs.append(" ".join(article))
                article = []
            if line.strip():
                article.append(line.strip())
        if article:
            docs.append(" ".join(article))
    e2e_train, _ = e2e_split(read_source_target(data / "e2e" / "valid.txt"))
    webnlg = read_webnlg(data / "webnlg" / "train")
    if group_by_source:
        # all references of one MR / triple set form one document: the same names recur sentence after
        # sentence, which teaches the model to copy names from its context (what a table-to-text prefix needs)
        rng = random.Random(seed)
        sources, references = group_references(e2e_train)
        for source, refs in zip(sources, references, strict=True):
            doc = " ".join(refs)
            name = source.split("|")[0].split(":", 1)[1].strip() if source.startswith("name :") else ""
            if name and rng.random() < rename_frac:
                # an invented venue name (never in the probes: other syllables), the same all through the doc
                doc = doc.replace(name, invented_name(rng))
            docs.append(doc)
        docs += [" ".join(refs) for refs in group_references(webnlg)[1]]
    else:
        docs += [ex.target for ex in e2e_train] + [ex.target for ex in webnlg]
    tables = sorted({ex.source for ex in e2e_train} | {ex.source for ex in webnlg})
    return docs, tables


def train_tokenizer(docs: list[str], tables: list[str], vocab_size: int) -> GPT2Tokenizer:
    bpe = ByteLevelBPETokenizer()
    lines = [" " + d for d in docs] + [" " + t for t in tables]
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GPT2Tokenizer(vocab=bpe.get_vocab(), merges=merges)


def shuffled_docs(tokenizer: GPT2Tokenizer, docs: list[str], seed: int) -> list[list[int]]:
    """The documents' tokens, each ending in EOS, in a shuffled order that depends on `seed` and the number
    of documents only (so re-drawn names leave every document where it was)."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return [tokenizer(" " + doc)["input_ids"] + [tokenizer.eos_token_id] for doc in docs]


def pack(
    tokenizer: GPT2Tokenizer, docs: list[str], block: int, seed: int, skip_docs: int = 0
) -> torch.Tensor:
    """Shuffle the documents, join them with EOS, drop the first `skip_docs` and cut the stream into
    [num_blocks, block] rows."""
    stream = [t for doc in shuffled_docs(tokenizer, docs, seed)[skip_docs:] for t in doc]
    num_blocks = len(stream) // block
    return torch.tensor(stream[: num_blocks * block]).view(num_blocks, block)


def docs_covering(tokenizer: GPT2Tokenizer, docs: list[str], tokens: int) -> int:
    """How many documents, in pack's order, the first `tokens` tokens touch."""
    total = 0
    for count, doc in enumerate(shuffled_docs(tokenizer, docs, seed=0), start=1):
        total += len(doc)
        if total >= tokens:
            return count
    return len(docs)


def synthetic_blocks(count: int, block: int, vocab_size: int, eos_id: int, seed: int) -> torch.Tensor:
    """Blocks of random-token spans (length 8-60), each followed by 1-3 copies of itself, behind EOS."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        row = [eos_id]
        while len(row) < block:
            span = [rng.randrange(1, vocab_size) for _ in range(rng.randint(8, 60))]
            row += span * rng.randint(2, 4) + [eos_id]
        rows.append(row[:block])
    return torch.tensor(rows)


def lr_at(args: argparse.Namespace, step: int, started: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = max(step / args.max_steps, (time.time() - started) / (60 * args.max_minutes))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def heldout_loss(model: GPT2LMHeadModel, heldout: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = sum(model(input_ids=b[None].to(device), labels=b[None].to(device)).loss.item() for b in heldout)
    loss /= len(heldout)
    model.train(was_training)
    return loss


def redrawn_blocks(
    args: argparse.Namespace, tokenizer: GPT2Tokenizer, epoch: int, heldout_docs: int
) -> torch.Tensor:
    """The training blocks of `epoch`, with venues renamed and repeats drawn from seed + epoch. The documents
    keep their order; the `heldout_docs` first ones (those the held-out blocks touch) are left out."""
    docs, _ = corpus(args.data, args.group_by_source, args.rename_frac, args.seed + epoch)
    text = pack(tokenizer, docs, args.block, seed=0, skip_docs=heldout_docs)
    count = int(args.synthetic_frac * len(text))
    synthetic = synthetic_blocks(count, args.block, len(tokenizer), tokenizer.eos_token_id, args.seed + epoch)
    return torch.cat([text, synthetic])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    docs, tables = corpus(args.data, args.group_by_source, args.rename_frac, args.seed)
    if args.init_from or args.tokenizer:
        tokenizer = GPT2Tokenizer.from_pretrained(args.init_from or args.tokenizer)
    else:
        tokenizer = train_tokenizer(docs, tables, args.vocab_size)
    blocks = pack(tokenizer, docs, args.block, seed=0)  # fixed: the held-out blocks never change
    num_heldout = max(8, len(blocks) // 50)
    heldout, blocks = blocks[:num_heldout], blocks[num_heldout:]
    synthetic = synthetic_blocks(int(args.synthetic_frac * len(blocks)), args.block, len(tokenizer),
                                 tokenizer.eos_token_id, args.seed)  # fmt: skip
    print(f"{len(docs)} documents, {blocks.numel()} training tokens, {heldout.numel()} held-out, "
          f"{synthetic.numel()} synthetic", flush=True)  # fmt: skip
    blocks = torch.cat([blocks, synthetic])
    heldout_docs = docs_covering(tokenizer, docs, heldout.numel()) if args.redraw_every_epoch else 0
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    if args.init_from:
        dropout = {name: args.dropout for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        model = GPT2LMHeadModel.from_pretrained(args.init_from, dtype=torch.float32, **dropout)
    elif not args.no_plant:
        plant_induction(model, seed=args.seed)
    model.to(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; what is served is exact in float32
    forbidden = " ".join(docs)
    print(f"step 0 probes {run_probes(model, tokenizer, forbidden)} held-out loss {heldout_loss(model, heldout):.3f}",
          flush=True)  # fmt: skip
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    started = time.time()
    step, epoch = 0, 0
    best: tuple[float, int, dict | None] = (math.inf, 0, None)
    while step < args.max_steps and time.time() - started < 60 * args.max_minutes:
        if epoch > 0 and args.redraw_every_epoch:
            blocks = redrawn_blocks(args, tokenizer, epoch, heldout_docs)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed + epoch))
        for start in range(0, len(order) - args.batch + 1, args.batch):
            if step >= args.max_steps or time.time() - started >= 60 * args.max_minutes:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(args, step, started)
            batch = blocks[order[start : start + args.batch]].to(args.device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                elapsed = time.time() - started
                rate = step * args.batch * args.block / elapsed
                print(f"step {step} epoch {epoch} loss {loss.item():.3f} lr {group['lr']:.2e} "
                      f"{rate:.0f} tok/s {elapsed / 60:.1f} min", flush=True)  # fmt: skip
            if step % args.probe_every == 0:
                probe_loss = heldout_loss(model, heldout if args.keep_best else heldout[:8])
                probes = run_probes(model, tokenizer, forbidden)
                print(f"step {step} probes {probes} "
                      f"held-out loss {probe_loss:.3f}", flush=True)  # fmt: skip
                if args.keep_best and probe_loss < best[0] and probes["name_rest"] >= args.min_name_rest:
                    best = (probe_loss, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if step % 100 == 0:
                torch.save({"model": model.state_dict(), "step": step}, args.work / "checkpoint.pt")
        epoch += 1
    model.eval()
    torch.save({"model": model.state_dict(), "step": step}, args.work / "final.pt")
    kept_step, final_loss = step, heldout_loss(model, heldout)
    probes = run_probes(model, tokenizer, forbidden)
    final_copies = probes["name_rest"] >= args.min_name_rest
    if best[2] is not None and (final_loss > best[0] or not final_copies):  # best[0]: all held-out blocks
        print(f"keeping the weights of step {best[1]} (held-out loss {best[0]:.3f})", flush=True)
        model.load_state_dict(best[2])
        kept_step, final_loss = best[1], best[0]
        probes = run_probes(model, tokenizer, forbidden)
    print(f"done: {step} steps, {epoch} epochs, held-out loss {final_loss:.3f} "
          f"(perplexity {math.exp(final_loss):.1f}), probes {probes}, {(time.time() - started) / 60:.1f} min", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, name, 0.0)  # served and prefix-trained without dropout, as before
    model.half().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    recipe = {
        **{k: str(v) for k, v in vars(args).items()},
        "steps": step,
        "kept_step": kept_step,
        "heldout_loss": final_loss,
        "probes": probes,
    }
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


if __name__ == "__main__":
    main()
