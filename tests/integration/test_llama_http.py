"""prefix-serve on a tiny Llama-family backbone, over HTTP: PEFT adapters uploaded as PEFT saves them are
imported per key/value head and served PEFT-exact, concurrently; prefixes of another family are refused with
both shapes named, and nothing is stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS, assert_prefixes_matter, make_peft_adapter, peft_generate
from serving import running_server, upload_peft
from test_serve_exact import generate_all
from tiny_models import build_llama

from prefix_store.format import Prefix, save_prefix


@pytest.mark.slow
def test_peft_adapters_upload_and_serve_exactly_and_other_families_are_refused(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    model_dir = build_llama(tmp_path / "qwen2", "qwen2")
    adapters = {
        f"t/a{i}": make_peft_adapter(model_dir, "qwen2", n, tmp_path / f"a{i}", seed=20 + i, scale=1.0)
        for i, n in enumerate([4, 9])
    }
    expected = {None: peft_generate(model_dir, "qwen2", None, PROMPTS, MAX_NEW)}
    expected |= {k: peft_generate(model_dir, "qwen2", p, PROMPTS, MAX_NEW) for k, p in adapters.items()}
    assert_prefixes_matter(expected)
    gpt2_adapter = make_peft_adapter(tiny_gpt2_dir, "gpt2", 4, tmp_path / "gpt2-adapter", seed=1)
    with (
        running_server(model_dir, str(tmp_path / "store"), tmp_path, args=["--max-num-seqs", "6"]) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for prefix_id, path in adapters.items():
            response = upload_peft(client, prefix_id, path)
            assert response.status_code == 201, response.text
            assert response.json()["model_type"] == "qwen2"
        keys = [(prefix_id, i) for i in range(len(PROMPTS)) for prefix_id in [None, *adapters]]
        results = asyncio.run(generate_all(server.url, [(p, PROMPTS[i]) for p, i in keys]))
        for (prefix_id, i), got in zip(keys, results, strict=True):
            assert got == expected[prefix_id][i], (prefix_id, PROMPTS[i])

        # a GPT-2 adapter (4 heads of 16 per layer) on this Qwen2 (1 key/value head of 16): the shapes differ
        refused = upload_peft(client, "t/gpt2", gpt2_adapter)
        assert refused.status_code == 422, refused.text
        assert "[2, 2, 4, 4, 16]" in refused.text and "[2, 2, 1, 'P', 16]" in refused.text
        # a native GPT-2 file: the family is named, with both shapes
        native = Prefix("gpt2", {"decoder": torch.zeros(2, 2, 4, 3, 16)})
        refused = client.put("/v1/prefixes/t/native-gpt2", content=save_prefix(native),
                             headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert "gpt2 backbone (decoder [2, 2, 4, 3, 16])" in str(body) and "qwen2 backbone" in str(body)
        listed = client.get("/v1/prefixes", params={"tenant": "t"}).json()
        assert [m["id"] for m in listed["prefixes"]] == sorted(adapters)
