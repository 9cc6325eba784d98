"""prefix-serve --runner-process true over HTTP: the same tokens as the runner in one process, a hostile tenant
beside others changes none of theirs, a killed child turns /readyz 503 and refuses new work with a JSON 503,
Ctrl-C on the child is ignored and SIGTERM drains and stops both processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from edge_support import assert_error, native_prefix, put_native
from serving import running_server, start_server
from tiny_models import build_gpt2

from prefix_store.cache import DevicePrefix
from prefix_store.format import load_prefix
from prefix_store.store import make_meta
from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams

RUNNER_PROCESS = ["--runner-process", "true"]
PROMPTS = ["hello there", "the cat sat", "once upon a time"]


def child_of(pid: int) -> int:
    """The runner's process: the server's one child named prefixserve-run."""
    children = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    named = [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "prefixserve-run"]
    assert len(named) == 1, children
    return named[0]


def in_process_tokens(model_dir: Path, data: bytes, prompts: list[str], max_new: int) -> list[list[int]]:
    """What the runner in the engine's own thread gives for this prefix (the reference)."""
    prefix = load_prefix(data)
    device_prefix = DevicePrefix(
        make_meta("good/p", prefix, data, "native", False), prefix.targets, prefix.num_bytes
    )
    engine = Engine(load_backbone(model_dir, "cpu", "float32"), EngineConfig(max_num_seqs=4))
    engine.start()

    async def one(prompt: str) -> list[int]:
        request = engine.add(engine.tokenize(prompt), SamplingParams(max_new_tokens=max_new), device_prefix)
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    try:
        return asyncio.run(every())
    finally:
        engine.stop()


def test_runner_process_serves_the_same_tokens_and_a_hostile_tenant_changes_none(
    tiny_gpt2_dir: Path, tmp_path: Path
):
    good = native_prefix(6, seed=3)
    evil = native_prefix(4, fill=1e4)  # the largest value an upload may hold (--max-prefix-value)
    want = in_process_tokens(tiny_gpt2_dir, good, PROMPTS, 12)
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path / "logs", args=RUNNER_PROCESS) as s:
        child = child_of(s.process.pid)
        assert f"forward passes run in process {child}" in s.log()
        # the KV budget is planned where the weights are: the child measures the memory left after loading them
        assert "KV cache budget" in s.log() and "KV cache: budget" in s.log()
        # both processes size the forward's threads the same way (here OMP_NUM_THREADS=1, set by serving.py)
        assert "forward threads: 1 (OMP_NUM_THREADS)" in s.log()
        assert "runner process: forward threads: 1 (OMP_NUM_THREADS)" in s.log()
        with httpx.Client(base_url=s.url, timeout=120) as client:
            assert put_native(client, "good/p", good).status_code == 201
            assert put_native(client, "evil/p", evil).status_code == 201

            def whole(prefix: str, prompt: str) -> httpx.Response:
                return client.post(
                    "/v1/generate", json={"prefix": prefix, "prompt": prompt, "max_new_tokens": 12}
                )

            def streamed(prompt: str) -> list[int]:
                body = {"prefix": "good/p", "prompt": prompt, "max_new_tokens": 12, "stream": True}
                with client.stream("POST", "/v1/generate", json=body) as response:
                    assert response.status_code == 200
                    events = [
                        json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
                    ]
                return [e["token_id"] for e in events if e.get("token_id") is not None]

            assert [whole("good/p", p).json()["token_ids"] for p in PROMPTS] == want  # alone
            with ThreadPoolExecutor(
                24
            ) as pool:  # the good tenant's requests inside a flood of the evil one's
                flood = [pool.submit(whole, "evil/p", PROMPTS[i % 3]) for i in range(16)]
                goods = [pool.submit(whole, "good/p", p) for p in PROMPTS]
                streams = [pool.submit(streamed, p) for p in PROMPTS]
                assert [f.result().json()["token_ids"] for f in goods] == want
                assert [f.result() for f in streams] == want
                for response in (f.result() for f in flood):  # the evil tenant gets answers, its own
                    if response.status_code != 200:
                        assert_error(response, 422, "numerical_error")
            assert [whole("good/p", p).json()["token_ids"] for p in PROMPTS] == want  # and after it
            assert client.get("/readyz").status_code == 200
            metrics = client.get("/metrics").text
            assert "prefixserve_engine_step_cpu_seconds_total" in metrics


def test_a_killed_runner_process_makes_readyz_503_and_new_requests_a_json_503(
    tiny_gpt2_dir: Path, tmp_path: Path
):
    with (
        running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path / "logs", args=RUNNER_PROCESS) as s,
        httpx.Client(base_url=s.url, timeout=60) as client,
    ):
        assert client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        os.kill(child_of(s.process.pid), signal.SIGKILL)
        for _ in range(100):
            ready = client.get("/readyz")
            if ready.status_code == 503:
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and "runner process is gone" in ready.json()["reason"]
        first = client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
        assert first.status_code in (500, 503) and "error" in first.json()  # the step that finds it gone
        refused = client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
        body = assert_error(refused, 503, "engine_unavailable")
        assert "engine loop died" in body["error"]["message"] and refused.headers["retry-after"]
        assert client.get("/healthz").status_code == 200  # the process is up, and says what is wrong


@pytest.fixture(scope="module")
def slower_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(
        tmp_path_factory.mktemp("runner-process") / "gpt2-512", n_layer=4, n_embd=128, n_positions=512
    )


def test_ctrl_c_on_the_child_is_ignored_and_sigterm_drains_then_stops_both(
    slower_model: Path, tmp_path: Path
):
    server = start_server(slower_model, str(tmp_path / "store"), tmp_path / "logs", args=RUNNER_PROCESS)
    try:
        child = child_of(server.process.pid)
        os.kill(child, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        body = {"prompt": "hello", "max_new_tokens": 300, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=server.url, timeout=120) as client,
            client.stream("POST", "/v1/generate", json=body) as response,
        ):
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert "token_id" in first
            server.process.send_signal(signal.SIGTERM)  # drain: the running generation finishes whole
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 300
        assert server.process.wait(timeout=60) == 0, server.log()
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    finally:
        server.stop()
