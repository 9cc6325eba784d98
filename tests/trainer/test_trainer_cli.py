"""`prefix-train` end to end on a tiny backbone: data file in, native prefix file out, upload by PUT."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from prefix_store.format import load_prefix, validate
from trainer.backbone import load_backbone
from trainer.cli import main

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
    assert float(prefix.extra_metadata["x-dev-bleu"]) >= 0.0
    assert (tmp_path / "out" / "e2e.safetensors.checkpoint.pt").exists()


class _Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict, bytes]] = []

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
    path, headers, body = _Recorder.requests[-1]
    assert path == "/v1/prefixes/demo/e2e"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Authorization"] == "Bearer k-123"
    assert body == output.read_bytes()
    assert load_prefix(body).target_names() == ["encoder", "decoder", "cross"]
