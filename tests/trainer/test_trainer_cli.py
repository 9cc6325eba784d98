"""`prefix-train` end to end on a tiny backbone: data file in, native prefix file out, upload by PUT."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from prefix_store.format import load_prefix, validate
from trainer.backbone import load_backbone
from trainer.cli import build_parser, main
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


class _Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict, bytes]] = []
    list_status = 200  # what GET /v1/prefixes (the check before training) answers

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        _Recorder.requests.append((self.path, dict(self.headers), b""))
        payload = json.dumps({"prefixes": [], "next_cursor": None}).encode()
        self.send_response(_Recorder.list_status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.requests.append((self.path, dict(self.headers), body))
        payload = json.dumps({"id": "demo/e2e"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_upload_puts_the_native_file(
    tiny_bart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "k-123")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"source": p.split("||")[0], "target": p.split("||")[1]}) for p in PAIRS)
    )
    output = tmp_path / "bart.safetensors"
    try:
        main(["--model", str(tiny_bart_dir), "--train", str(data), "--output", str(output), "--max-steps", "1",
              "--mid-dim", "16", "--quiet", "--upload", f"http://127.0.0.1:{server.server_port}/demo/e2e"])  # fmt: skip
    finally:
        server.shutdown()
    assert _Recorder.requests[-2][0] == "/v1/prefixes?tenant=demo&limit=1"  # checked before training
    path, headers, body = _Recorder.requests[-1]
    assert path == "/v1/prefixes/demo/e2e"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Authorization"] == "Bearer k-123"
    assert body == output.read_bytes()
    assert load_prefix(body).target_names() == ["encoder", "decoder", "cross"]


def _write_pairs(tmp_path: Path) -> Path:
    data = tmp_path / "pairs.txt"
    data.write_text("\n".join(PAIRS) + "\n")
    return data


def _one_line_error(capsys: pytest.CaptureFixture, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prefix-train: error: "), err
    return err[0]


def test_help_shows_every_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = {b.split()[0].rstrip(","): " ".join(b.split()) for b in options.split("\n  -")[1:]}
    for option in build_parser()._actions:
        name = option.option_strings[0].lstrip("-")
        if name in ("h", "model", "train", "output"):
            assert name == "h" or "(required)" in blocks["-" + name]
            continue
        assert "default" in blocks["-" + name], blocks["-" + name]
    text = " ".join(blocks.values())
    assert "(default: 5e-3 on CPU, 8e-5 -- the paper's -- on CUDA; see docs/demo.md)" in text
    assert "(default: 10)" in text  # --batch-size


@pytest.mark.parametrize("missing", ["--train", "--dev", "--model"])
def test_a_missing_input_is_one_line_before_anything_loads(
    missing: str, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = {"--model": str(tiny_gpt2_dir), "--train": str(_write_pairs(tmp_path)), "--dev": str(_write_pairs(tmp_path)),
            "--output": str(tmp_path / "p.safetensors")}  # fmt: skip
    args[missing] = str(tmp_path / "nope")
    code = main([x for kv in args.items() for x in kv] + ["--quiet"])
    line = _one_line_error(capsys, code)
    assert missing in line and "nope" in line
    assert not (tmp_path / "p.safetensors.checkpoint.pt").exists()


def test_a_malformed_data_file_is_one_line(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("no separator here\n")
    code = main(
        ["--model", str(tiny_gpt2_dir), "--train", str(bad), "--output", str(tmp_path / "p.safetensors")]
    )
    assert "expected 'source||target'" in _one_line_error(capsys, code)


def test_an_unreachable_upload_server_fails_before_training(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    port = server.server_port
    server.server_close()  # nothing listens on this port any more
    code = main(["--model", str(tiny_gpt2_dir), "--train", str(_write_pairs(tmp_path)), "--output",
                 str(tmp_path / "p.safetensors"), "--upload", f"http://127.0.0.1:{port}/demo/e2e", "--quiet"])  # fmt: skip
    assert f"cannot reach the upload server http://127.0.0.1:{port}" in _one_line_error(capsys, code)
    assert not (tmp_path / "p.safetensors.checkpoint.pt").exists()
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize(
    ("status", "says"), [(401, "refused the key"), (404, "may not upload under tenant 'demo'")]
)
def test_a_bad_key_fails_before_training(
    status: int, says: str, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(_Recorder, "list_status", status)
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "wrong")
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main(["--model", str(tiny_gpt2_dir), "--train", str(_write_pairs(tmp_path)), "--output",
                     str(tmp_path / "p.safetensors"), "--upload", f"http://127.0.0.1:{server.server_port}/demo/e2e"])  # fmt: skip
    finally:
        server.shutdown()
    assert says in _one_line_error(capsys, code)
    assert not (tmp_path / "p.safetensors.checkpoint.pt").exists()


def test_a_bad_upload_url_is_one_line(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["--model", str(tiny_gpt2_dir), "--train", str(_write_pairs(tmp_path)), "--output",
                 str(tmp_path / "p.safetensors"), "--upload", "127.0.0.1:8000"])  # fmt: skip
    assert "must look like http://HOST:PORT/TENANT/NAME" in _one_line_error(capsys, code)


def test_the_run_says_where_checkpoints_go_and_the_learning_rate(
    tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "p.safetensors"
    with caplog.at_level("INFO", logger="prefix-train"):
        code = main(["--model", str(tiny_gpt2_dir), "--train", str(_write_pairs(tmp_path)), "--output", str(output),
                     "--max-steps", "1", "--mid-dim", "8", "--quiet", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert f"checkpoints go to {output}.checkpoint.pt" in caplog.text
    assert "learning rate 0.005 (the default on cpu" in caplog.text
    assert (tmp_path / "p.safetensors.checkpoint.pt").exists()


def test_upload_to_a_real_prefix_serve(
    tiny_bart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
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
        # checked before training: no key is refused, another tenant's namespace too, each in one line
        assert "refused the key" in _one_line_error(
            capsys, main([*argv, "--upload", f"{server.url}/demo/e2e"])
        )
        monkeypatch.setenv("PREFIXSERVE_API_KEY", key)
        assert "may not upload under tenant 'other'" in _one_line_error(
            capsys, main([*argv, "--upload", f"{server.url}/other/e2e"])
        )
        assert main([*argv, "--upload", f"{server.url}/demo/e2e"]) == 0
        tenant = {"Authorization": f"Bearer {key}"}
        meta = httpx.get(f"{server.url}/v1/prefixes/demo/e2e", headers=tenant, timeout=30).json()
        assert meta["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
        assert meta["targets"] == ["encoder", "decoder", "cross"] and meta["source"] == "native"
        body = {"prefix": "demo/e2e", "prompt": PAIRS[0].split("||")[0], "max_new_tokens": 4}
        answer = httpx.post(f"{server.url}/v1/generate", json=body, headers=tenant, timeout=60)
        assert answer.status_code == 200 and answer.json()["prefix"] == "demo/e2e", answer.text
