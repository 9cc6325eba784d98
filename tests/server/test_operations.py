"""Operations against a real prefix-serve: SIGTERM drain with a deadline, /readyz and the engine loop,
X-Request-Id in responses and log lines, --log-format json, the KV budget at start."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from serving import free_port, running_server, start_server
from tiny_models import build_gpt2

from server.engine.kv_cache import KVCache

LONG = {"prompt": "hello", "max_new_tokens": 2000, "ignore_eos": True}


def _events(stack: ExitStack, url: str, body: dict) -> Iterator[dict]:
    """A streamed generation on its own connection (sent now), as parsed events (without [DONE])."""
    client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
    response = stack.enter_context(client.stream("POST", "/v1/generate", json={**body, "stream": True}))
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    return (json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {"))


def _slow_upload(port: int, stop: threading.Event, sent: list[int]) -> None:
    """A client sending a generate body at 1 byte per 0.5 s for a minute: it must not hold the exit."""
    body = json.dumps({"prompt": "x" * 200}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode())
        for byte in body[:120]:
            if stop.wait(0.5):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed it
                return
            sent.append(byte)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2048 positions and some width: 2000 new tokens take seconds on any CPU
    return build_gpt2(tmp_path_factory.mktemp("ops") / "gpt2-2048", n_layer=6, n_embd=256, n_positions=2048)


def test_sigterm_drains_running_refuses_new_and_exits_0_by_the_deadline(slow_model: Path, tmp_path: Path):
    args = ["--max-num-seqs", "2", "--max-model-len", "2048", "--drain-timeout", "4"]
    server = start_server(slow_model, str(tmp_path / "store"), tmp_path / "logs", args=args)
    stop_slow = threading.Event()
    try:
        with ExitStack() as stack:
            short = _events(stack, server.url, {"prompt": "hello", "max_new_tokens": 40, "ignore_eos": True})
            assert "token_id" in next(short)  # running
            # one long one running beside it, two more waiting: more work than the deadline allows
            longs = [_events(stack, server.url, LONG) for _ in range(3)]
            assert "token_id" in next(longs[0])
            sent: list[int] = []
            slow = threading.Thread(target=_slow_upload, args=(server.port, stop_slow, sent), daemon=True)
            slow.start()
            time.sleep(0.3)

            server.process.send_signal(signal.SIGTERM)
            ready = httpx.get(f"{server.url}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = httpx.post(f"{server.url}/v1/generate", json={"prompt": "hi"}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert refused.headers["retry-after"]

            rest = list(short)  # the running request finishes whole
            assert rest[-1]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == 40
            # the rest is cut at the deadline (aborted), not left hanging
            finals = [list(events)[-1] for events in longs]
            assert any(f.get("finish_reason") == "abort" for f in finals), finals

            # exits 0 although the slow client is still sending (it would take a minute)
            assert server.process.wait(timeout=30) == 0, server.log()
            assert len(sent) < 120  # the slow body was still arriving
    finally:
        stop_slow.set()
        server.stop()
    assert "drain deadline (4 s) passed" in server.log()


def test_request_id_is_returned_and_on_every_log_line_about_the_request(tiny_gpt2_dir: Path, tmp_path: Path):
    with running_server(
        tiny_gpt2_dir,
        str(tmp_path / "store"),
        tmp_path / "logs",
        args=["--log-format", "json", "--retain-host-memory", "false"],
    ) as s:
        given = httpx.post(
            f"{s.url}/v1/generate",
            json={"prompt": "hello", "max_new_tokens": 3},
            headers={"X-Request-Id": "req-42.a"},
        )
        assert given.status_code == 200 and given.headers["x-request-id"] == "req-42.a"
        unsafe = httpx.post(f"{s.url}/v1/generate", json={"prompt": "hello", "max_new_tokens": 3},
                            headers={"X-Request-Id": "bad id\twith spaces"})  # fmt: skip
        generated = unsafe.headers["x-request-id"]
        assert generated != "bad id\twith spaces" and len(generated) == 32
        streamed = httpx.post(f"{s.url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 3, "stream": True},
                              headers={"X-Request-Id": "stream-7"})  # fmt: skip
        assert streamed.headers["x-request-id"] == "stream-7"
        missing = httpx.post(f"{s.url}/v1/generate", json={"prefix": "t/nope", "prompt": "hi"})
        assert missing.status_code == 404 and missing.headers["x-request-id"]
        time.sleep(0.5)
        lines = [line for line in s.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # --log-format json: every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    for request_id in ("req-42.a", generated, "stream-7"):
        about = [e for e in entries if e.get("request_id") == request_id]
        assert any(e["logger"] == "prefixserve.generation" for e in about), (request_id, about)
        assert any(e["logger"] == "uvicorn.access" for e in about), (request_id, about)
    # every access-log line is about a request, so every one carries its id
    assert all("request_id" in e for e in entries if e["logger"] == "uvicorn.access")
    # --retain-host-memory false: glibc's malloc left alone, so no start-up line about it
    assert not any(e["message"].startswith("host memory:") for e in entries)


def test_kv_budget_caps_the_sequences_and_says_so(tiny_gpt2_dir: Path, tmp_path: Path):
    per_seq = KVCache.bytes_per_slot(_tiny_shape(tiny_gpt2_dir), 128, 0, _float32())
    args = ["--max-num-seqs", "8", "--kv-cache-bytes", str(3 * per_seq + 100)]
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path / "logs", args=args) as s:
        prompts = [f"hello {i}" for i in range(6)]
        with httpx.Client(base_url=s.url, timeout=60) as client:
            alone = [_greedy(client, p) for p in prompts]
            threads_out: dict[int, list[int]] = {}
            threads = [
                threading.Thread(target=lambda i=i: threads_out.__setitem__(i, _greedy(client, prompts[i])))
                for i in range(len(prompts))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert [threads_out[i] for i in range(len(prompts))] == alone
        log = s.log()
    assert "holds 3 sequences x 128 positions" in log and "--max-num-seqs 8 capped to 3" in log, log
    assert "host memory: freed blocks kept for reuse" in log, log  # --retain-host-memory's default


def test_a_budget_below_one_sequence_refuses_to_start(tiny_gpt2_dir: Path, tmp_path: Path):
    with pytest.raises(RuntimeError) as failed:
        start_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path / "logs", args=["--kv-cache-bytes", "1000"],
                     port=free_port())  # fmt: skip
    message = str(failed.value)
    assert "cannot hold one sequence of 128 positions" in message and "--kv-cache-bytes" in message


def _greedy(client: httpx.Client, prompt: str) -> list[int]:
    response = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 8, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


def _tiny_shape(model_dir: Path):
    from prefix_store.format import BackboneShape

    config = json.loads((model_dir / "config.json").read_text())
    return BackboneShape("gpt2", config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"])


def _float32():
    import torch

    return torch.float32
