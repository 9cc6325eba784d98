"""Corpus BLEU (sacrebleu) of decoded outputs against ALL references of each distinct source."""

from __future__ import annotations

from dataclasses import dataclass

import sacrebleu
from tqdm import tqdm

from trainer.backbone import Backbone, PrefixTensors
from trainer.data import Example, group_references
from trainer.decode import beam_search


@dataclass
class Evaluation:
    bleu: float
    num_sources: int
    hypotheses: list[str]
    sources: list[str]

    def summary(self) -> str:
        return f"BLEU {self.bleu:.2f} on {self.num_sources} distinct sources"


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """references[i] = every reference of source i (any number >= 1). sacrebleu wants one stream per reference
    slot, padded with None where a source has fewer references."""
    if len(hypotheses) != len(references):
        raise ValueError("one list of references per hypothesis")
    width = max((len(refs) for refs in references), default=0)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score


def evaluate(backbone: Backbone, prefix: PrefixTensors | None, examples: list[Example], template: str | None,
             max_sources: int | None = None, num_beams: int = 1, max_new_tokens: int = 100,
             show_progress: bool = True) -> Evaluation:  # fmt: skip
    """Decode each distinct source once (greedy when num_beams == 1) and score against all its references."""
    sources, references = group_references(examples)
    if max_sources is not None:
        sources, references = sources[:max_sources], references[:max_sources]
    hypotheses = []
    for source in tqdm(sources, desc="decoding", disable=not show_progress, leave=False):
        prompt = backbone.prompt_ids(source, template)
        budget = min(max_new_tokens, backbone.max_positions - len(prompt) - _num_virtual_tokens(prefix))
        ids = beam_search(backbone, prefix, prompt, max(budget, 1), num_beams)
        hypotheses.append(backbone.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return Evaluation(corpus_bleu(hypotheses, references), len(sources), hypotheses, sources)


def _num_virtual_tokens(prefix: PrefixTensors | None) -> int:
    if not prefix or "decoder" not in prefix:
        return 0
    return prefix["decoder"].shape[3]
