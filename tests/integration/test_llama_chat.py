"""/v1/chat/completions on a Llama-family backbone whose tokenizer carries a chat template, over HTTP with the
`openai` package: the conversation is rendered by that template and tokenized as HF's
apply_chat_template(tokenize=True) does, so greedy output equals HF's generate (bare backbone) and PEFT's
(a prefix) on those ids."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from peft_oracle import make_peft_adapter
from serving import running_server, upload_peft
from tiny_models import build_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_NEW = 8
CHATS = [
    [{"role": "user", "content": "the quick brown fox"}],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "name : Blue Spice"},
        {"role": "user", "content": "area : city centre"},
    ],
]


def oracle(model_dir: Path, adapter: Path | None) -> list[str]:
    """Greedy text per chat from HF (or PEFT with `adapter`) on apply_chat_template's ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    texts = []
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        input_ids = torch.tensor([list(ids)])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )
        texts.append(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_chat_with_a_chat_template_equals_hf_and_peft(tmp_path: Path) -> None:
    model_dir = build_llama(tmp_path / "llama", "llama")
    adapter = make_peft_adapter(model_dir, "llama", 6, tmp_path / "adapter", seed=3, scale=1.0)
    expected = {None: oracle(model_dir, None), "t/chat": oracle(model_dir, adapter)}
    assert expected[None] != expected["t/chat"]  # the prefix matters, or the check below proves nothing
    with running_server(model_dir, str(tmp_path / "store"), tmp_path) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert upload_peft(http, "t/chat", adapter).status_code == 201
        for model, texts in (("llama", expected[None]), ("t/chat", expected["t/chat"])):
            for chat, text in zip(CHATS, texts, strict=True):
                got = client.chat.completions.create(
                    model=model,
                    messages=chat,
                    max_tokens=MAX_NEW,
                    temperature=0,  # type: ignore[arg-type]
                )
                assert got.choices[0].message.content == text, (model, chat)
