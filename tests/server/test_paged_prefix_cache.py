"""The server's prefix cache under each KV layout (in-process app): with `--kv-layout paged` it makes no device copy
of a prefix (the pool's blocks are the only one, written once), with slots it does; PEFT's tokens either way."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from peft_oracle import MAX_NEW, PROMPTS, make_peft_adapter, peft_generate
from serving import upload_peft

from server import app as app_module
from server.app import create_app
from server.settings import Settings


@pytest.mark.parametrize("layout", ["paged", "slots"])
def test_the_prefix_cache_copies_a_prefix_to_the_device_only_with_slots(
    layout: str, tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch
):
    copies: list[str] = []
    upload, stage = app_module.upload, app_module.stage
    monkeypatch.setattr(app_module, "upload", lambda *a: copies.append("device") or upload(*a))
    monkeypatch.setattr(app_module, "stage", lambda *a: copies.append("host") or stage(*a))
    adapter = make_peft_adapter(tiny_gpt2_dir, "gpt2", 5, tmp_path / "adapter", seed=3)
    want = peft_generate(tiny_gpt2_dir, "gpt2", adapter, PROMPTS[:2], MAX_NEW)
    settings = Settings(
        model=str(tiny_gpt2_dir),
        store=str(tmp_path / "store"),
        device="cpu",
        dtype="float32",
        kv_layout=layout,
        kv_block_size=4,
        max_num_seqs=4,
    )
    with TestClient(create_app(settings)) as client:
        assert upload_peft(client, "t/a", adapter).status_code == 201
        for prompt, ids in zip(PROMPTS[:2], want, strict=True):
            body = {"prefix": "t/a", "prompt": prompt, "max_new_tokens": MAX_NEW}
            assert client.post("/v1/generate", json=body).json()["token_ids"] == ids
        pool = client.app.state.engine.runner.block_pool
    assert copies == (["host"] if layout == "paged" else ["device"])  # one load, one target (the decoder)
    if layout == "paged":  # written into the pool by the first request, found there by the second
        assert (pool.num_prefix_loads, pool.num_prefix_hits) == (1, 1)
