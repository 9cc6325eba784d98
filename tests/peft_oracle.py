"""The oracle: PEFT's own generate for a prefix-tuning adapter (and HF's for the bare backbone)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

DEVICE = "cpu"  # where the oracle runs by default; `pytest --device cuda` sets it (conftest)
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
    return AutoModelForSeq2SeqLM if kind == "bart" else AutoModelForCausalLM


def make_peft_adapter(
    model_dir: Path, kind: str, num_tokens: int, out: Path, seed: int, scale: float = 0.5
) -> Path:
    """A PEFT prefix-tuning adapter with random (large enough to matter) prefix values, saved as PEFT saves it."""
    torch.manual_seed(seed)
    task = "SEQ_2_SEQ_LM" if kind == "bart" else "CAUSAL_LM"
    model = get_peft_model(
        _auto(kind).from_pretrained(model_dir),
        PrefixTuningConfig(task_type=task, num_virtual_tokens=num_tokens),
    )
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, scale)
    model.save_pretrained(out)
    return out


def peft_generate(
    model_dir: Path,
    kind: str,
    adapter: Path | None,
    prompts: list[str],
    max_new_tokens: int,
    device: str | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy token ids per prompt (or what `generate_kwargs` ask for, e.g. num_beams), one request at a time,
    as prefixserve reports them (no prompt, no final EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _auto(kind).from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    device = device or DEVICE
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
        ids = out[0, 1:] if kind == "bart" else out[0, enc["input_ids"].shape[1] :]
        ids = ids.tolist()
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        results.append(ids)
    return results


def assert_prefixes_matter(expected: dict[str | None, list[list[int]]]) -> None:
    """Guard for the parity tests: an oracle in which the prefixes do not move greedy output cannot tell a
    server that ignores them from a correct one. `expected` maps None (bare backbone) and each prefix id to
    the expected ids per prompt; every adapter must differ from the bare backbone on every prompt, and no two
    adapters may agree on all prompts (so serving one adapter in place of another fails too)."""
    bare = expected[None]
    adapters = {k: v for k, v in expected.items() if k is not None}
    assert adapters, "no adapters in the oracle"
    for prefix_id, ids in adapters.items():
        same = [i for i, (got, base) in enumerate(zip(ids, bare, strict=True)) if got == base]
        assert not same, f"{prefix_id}: PEFT's output equals the bare backbone's for prompts {same}"
    outputs = [tuple(map(tuple, ids)) for ids in adapters.values()]
    assert len(set(outputs)) == len(outputs), "two adapters give the same output on every prompt"
