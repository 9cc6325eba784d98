"""/readyz follows the engine loop (in-process app): a dead or stuck loop is 503; the default KV budget."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server import app as app_module
from server.app import create_app
from server.settings import Settings


def _settings(model: Path, tmp_path: Path, **overrides) -> Settings:
    # in-process runner: these tests break its step or its memory probe (test_runner_process_http kills the child)
    overrides.setdefault("runner_process", False)
    return Settings(
        model=str(model), store=str(tmp_path / "store"), device="cpu", dtype="float32", **overrides
    )


def test_dead_engine_loop_makes_readyz_503_and_fails_waiting_requests(tiny_gpt2_dir: Path, tmp_path: Path):
    with TestClient(create_app(_settings(tiny_gpt2_dir, tmp_path))) as client:
        assert client.get("/readyz").status_code == 200
        engine = client.app.state.engine

        def broken_step():
            raise RuntimeError("boom")

        engine.step = broken_step  # the next step kills the loop
        response = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 2})
        assert response.status_code == 500 and "engine loop died" in response.json()["error"]["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert (
            ready.json()["status"] == "engine_unavailable" and "RuntimeError: boom" in ready.json()["reason"]
        )


def test_stuck_engine_step_makes_readyz_503_until_it_finishes(tiny_gpt2_dir: Path, tmp_path: Path):
    with TestClient(create_app(_settings(tiny_gpt2_dir, tmp_path, max_step_seconds=0.2))) as client:
        engine = client.app.state.engine
        release = threading.Event()
        step = engine.step

        def stuck_step():
            release.wait(30)
            return step()

        engine.step = stuck_step
        worker = threading.Thread(
            target=lambda: client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 2})
        )
        worker.start()
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "stuck" in ready.json()["reason"]
        engine.step = step
        release.set()
        worker.join(30)
        assert client.get("/readyz").status_code == 200


def test_default_kv_budget_too_small_for_max_num_seqs_starts_with_fewer(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # tiny GPT-2: 2 layers x 2 (K, V) x 4 heads x 16 dims x 4 bytes x 128 positions = 64 KiB per sequence;
    # "free memory" after loading the model: what 80% of leaves 5 sequences
    per_seq = 2 * 2 * 4 * 16 * 4 * 128
    monkeypatch.setattr(app_module, "available_memory", lambda device: int(5.5 * per_seq / 0.8))
    caplog.set_level(logging.INFO)
    with TestClient(create_app(_settings(tiny_gpt2_dir, tmp_path, cache_bytes=0, max_num_seqs=64))) as client:
        engine = client.app.state.engine
        assert engine.config.max_num_seqs == 5 and engine.runner.cache.self_kv.shape[2] == 5
        assert client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200
    assert (
        "holds 5 sequences x 128 positions" in caplog.text and "--max-num-seqs 64 capped to 5" in caplog.text
    )
