"""The oracle: PEFT's own generate for a prefix-tuning adapter (and HF's for the bare backbone)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

MAX_NEW = 10
LENGTHS = [3, 5, 8, 12]
PROMPTS = [
    "the quick brown fox",
    "name : Blue Spice | Type : coffee shop | area : city centre",
    "hello",
    "Aarhus Airport : cityServed",
    "prefix tuning keeps the backbone frozen",
]


def _auto(kind: str):
    return AutoModelForCausalLM if kind == "gpt2" else AutoModelForSeq2SeqLM


def make_peft_adapter(model_dir: Path, kind: str, num_tokens: int, out: Path, seed: int) -> Path:
    """A PEFT prefix-tuning adapter with random (large enough to matter) prefix values, saved as PEFT saves it."""
    torch.manual_seed(seed)
    task = "CAUSAL_LM" if kind == "gpt2" else "SEQ_2_SEQ_LM"
    model = get_peft_model(
        _auto(kind).from_pretrained(model_dir),
        PrefixTuningConfig(task_type=task, num_virtual_tokens=num_tokens),
    )
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def peft_generate(
    model_dir: Path,
    kind: str,
    adapter: Path | None,
    prompts: list[str],
    max_new_tokens: int,
    device: str = "cpu",
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy token ids per prompt (or what `generate_kwargs` ask for, e.g. num_beams), one request at a time,
    as prefixserve reports them (no prompt, no final EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _auto(kind).from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    eos = (
        model.generation_config.eos_token_id
        if adapter is None
        else model.base_model.generation_config.eos_token_id
    )
    results = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        ids = out[0, enc["input_ids"].shape[1] :] if kind == "gpt2" else out[0, 1:]
        ids = ids.tolist()
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        results.append(ids)
    return results
