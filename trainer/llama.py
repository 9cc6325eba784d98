"""The Llama family (Llama, Qwen2, Mistral) for training: GPT-2's decoder-only recipe with HF's own forward.

Where the prefix enters is the same as for GPT-2 (trainer/backbone.py): the prefix's keys and values sit first
in every layer's cache and real tokens take position ids P, P+1, ...; HF's Llama attention rotates only the
new keys, so the prefix's keys stay as stored, as PEFT and the server have them. What differs is the
tokenizer: Llama-family tokenizers add BOS to every text, so the target is tokenised without it.
"""

from __future__ import annotations

from prefix_store.format import apply_template
from trainer.backbone import Features, GPT2Backbone
from trainer.data import Example


class LlamaBackbone(GPT2Backbone):
    model_type = "llama"  # also Qwen2 and Mistral: shape and spec come from the model's config

    def default_template(self) -> str:
        return "{source}\n"

    def featurize(self, example: Example, template: str) -> Features:
        source_ids = self.tokenizer(apply_template(template, example.source))["input_ids"]
        target = self.tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
        return Features(source_ids, target + [self.eos_token_id])
