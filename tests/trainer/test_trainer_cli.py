"""`prefix-train` end to end on a tiny backbone: data file in, native prefix file out, upload by PUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefix_store.format import load_prefix, validate
from trainer.backbone import load_backbone
from trainer.cli import main
from trainer.data import read_examples
from trainer.evaluate import evaluate

PAIRS = [
    "name : Blue Spice | Type : coffee shop | area : city centre||The Blue Spice coffee shop is in the city centre .",
    "name : Blue Spice | Type : coffee shop | area : city centre||Blue Spice is a coffee shop in the city centre .",
    "name : Alimentum | area : city centre | family friendly : no||Alimentum is not family - friendly .",
]


def test_cli_trains_evaluates_and_writes_a_servable_prefix(tiny_gpt2_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    data = tmp_path / "pairs.txt"
    data.write_text("\n".join(PAIRS) + "\n")
    output = tmp_path / "out" / "e2e.safetensors"
    code = main(["--model", str(tiny_gpt2_dir), "--train", str(data), "--dev", str(data), "--output", str(output),
                 "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--mid-dim", "16", "--prefix-length", "3",
                 "--max-new-tokens", "12", "--quiet", "--device", "cpu"])  # fmt: skip
    assert code == 0
    prefix = load_prefix(output.read_bytes())
    validate(prefix, load_backbone(tiny_gpt2_dir).shape)
    assert prefix.num_virtual_tokens == 3
    assert prefix.prompt_template == " {source} <|endoftext|>"
    assert prefix.extra_metadata["x-train-steps"] == "4"
    # the BLEU it reports is the BLEU of the prefix it wrote: re-evaluated here from the file
    again = evaluate(load_backbone(tiny_gpt2_dir), prefix.targets, read_examples(data), prefix.prompt_template,
                     max_new_tokens=12, show_progress=False)  # fmt: skip
    assert prefix.extra_metadata["x-dev-bleu"] == f"{again.bleu:.2f}"
    assert again.num_sources == 2
    # and it is BLEU: with the outputs themselves as references, the same training run scores 100
    echoed = tmp_path / "echo.txt"
    echoed.write_text(
        "".join(f"{s}||{h}\n" for s, h in zip(again.sources, again.hypotheses, strict=True) if h)
    )
    assert echoed.read_text(), "the prefix produced no text at all"
    second = tmp_path / "out" / "again.safetensors"
    assert main(["--model", str(tiny_gpt2_dir), "--train", str(data), "--dev", str(echoed), "--output", str(second),
                 "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--mid-dim", "16", "--prefix-length", "3",
                 "--max-new-tokens", "12", "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    assert load_prefix(second.read_bytes()).extra_metadata["x-dev-bleu"] == "100.00"
    assert (tmp_path / "out" / "e2e.safetensors.checkpoint.pt").exists()


def test_upload_to_a_real_prefix_serve(
    tiny_bart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--upload against a real prefix-serve with auth on: the tenant key from PREFIXSERVE_API_KEY is used, the
    stored prefix is byte-for-byte the written file, and the server generates with it."""
    import hashlib

    import httpx
    from serving import running_server

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"source": p.split("||")[0], "target": p.split("||")[1]}) for p in PAIRS)
    )
    output = tmp_path / "bart.safetensors"
    argv = ["--model", str(tiny_bart_dir), "--train", str(data), "--output", str(output), "--max-steps", "1",
            "--mid-dim", "16", "--quiet", "--device", "cpu"]  # fmt: skip
    admin = {"Authorization": "Bearer trainer-admin-key-0123456789"}
    env = {"PREFIXSERVE_ADMIN_KEY": admin["Authorization"][7:]}
    with running_server(tiny_bart_dir, str(tmp_path / "store"), tmp_path / "logs", env=env) as server:
        created = httpx.post(f"{server.url}/v1/tenants/demo/keys", headers=admin, timeout=30)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        monkeypatch.delenv("PREFIXSERVE_API_KEY", raising=False)
        with pytest.raises(RuntimeError, match="HTTP 401"):  # no key: refused, and said so
            main([*argv, "--upload", f"{server.url}/demo/e2e"])
        monkeypatch.setenv("PREFIXSERVE_API_KEY", key)
        with pytest.raises(RuntimeError, match="HTTP 40[34]"):  # another tenant's namespace
            main([*argv, "--upload", f"{server.url}/other/e2e"])
        assert main([*argv, "--upload", f"{server.url}/demo/e2e"]) == 0
        tenant = {"Authorization": f"Bearer {key}"}
        meta = httpx.get(f"{server.url}/v1/prefixes/demo/e2e", headers=tenant, timeout=30).json()
        assert meta["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
        assert meta["targets"] == ["encoder", "decoder", "cross"] and meta["source"] == "native"
        body = {"prefix": "demo/e2e", "prompt": PAIRS[0].split("||")[0], "max_new_tokens": 4}
        answer = httpx.post(f"{server.url}/v1/generate", json=body, headers=tenant, timeout=60)
        assert answer.status_code == 200 and answer.json()["prefix"] == "demo/e2e", answer.text
