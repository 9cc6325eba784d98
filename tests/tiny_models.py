"""Tiny random GPT-2 and BART backbones, built in the test: a tokenizer trained on a few lines, random weights,
saved as real HF directories so the code under test loads them with from_pretrained. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
)

LINES = [
    "name : Blue Spice | Type : coffee shop | area : city centre",
    "The Blue Spice coffee shop is in the city centre .",
    "name : Alimentum | area : city centre | family friendly : no",
    "There is a place in the city centre , Alimentum , that is not family - friendly .",
    "the quick brown fox jumps over the lazy dog",
    "Aarhus Airport : cityServed : Aarhus , Denmark",
    "hello world , this is a tiny tokenizer for tests",
    "prefix tuning keeps the backbone frozen and learns keys and values",
]
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_bpe(
    lines: list[str], specials: list[str], vocab_size: int = 400
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on `lines`: (vocab, merges in rank order), as GPT2Tokenizer/BartTokenizer take them."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    return bpe.get_vocab(), [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_gpt2(
    path: Path, n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_positions: int = 128, seed: int = 0
) -> Path:
    vocab, merges = train_bpe(LINES * 4, ["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.08,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_bart(
    path: Path, layers: int = 2, heads: int = 4, d_model: int = 64, max_positions: int = 128, seed: int = 0
) -> Path:
    vocab, merges = train_bpe(LINES * 4, BART_SPECIALS)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        init_std=0.08,
        tie_word_embeddings=False,
    )
    model = BartForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A ChatML template (as Qwen2 ships): the tokenizer adds BOS itself, so the rendered text carries none.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_chat_tokenizer(path: Path, lines: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer the way Llama-family checkpoints ship one: BOS added before every text, EOS
    `</s>`, and a chat template (tokenizer.chat_template), saved in `path`; trained on `lines` (LINES)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines or LINES * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=CHAT_SPECIALS,
        show_progress=False,
    )
    backend = bpe._tokenizer
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(path)
    return tokenizer


# Tiny random configs of the Llama family: grouped-query attention (2 or 4 query heads per key/value head),
# tied and untied embeddings, the rope variants and head sizes real checkpoints carry.
LLAMA_KINDS = {
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(num_key_value_heads=1, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
    "mistral": dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=32, sliding_window=64),
}  # fmt: skip


def build_llama(
    path: Path,
    kind: str = "llama",
    layers: int = 2,
    heads: int = 4,
    hidden: int = 64,
    max_positions: int = 128,
    seed: int = 0,
    **overrides,
) -> Path:
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (`kind`) with a chat tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_chat_tokenizer(path)
    torch.manual_seed(seed)
    settings = {**LLAMA_KINDS[kind], **overrides}
    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.08,
        **settings,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return path
