"""The engine's thread as an operator sees it: named in the OS, and how much of its step time it waited."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.engine import ENGINE_THREAD_NAME
from server.settings import Settings


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}_total (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


@pytest.fixture
def client(tiny_gpt2_dir: Path, tmp_path: Path):
    settings = Settings(
        model=str(tiny_gpt2_dir),
        store=str(tmp_path / "store"),
        device="cpu",
        dtype="float32",
        runner_process=False,  # these tests wrap the in-process runner's execute
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")
def test_engine_thread_is_named_in_the_os(client: TestClient) -> None:
    engine_threads = [t for t in threading.enumerate() if t.name == ENGINE_THREAD_NAME]
    assert len(engine_threads) == 1
    comm = Path(f"/proc/self/task/{engine_threads[0].native_id}/comm").read_text().strip()
    assert comm == ENGINE_THREAD_NAME[:15] == "prefixserve-eng"  # what top -H and py-spy show


def test_metrics_split_step_time_into_the_engine_threads_cpu_and_its_waits(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 6, "ignore_eos": True})
    assert response.status_code == 200
    text = client.get("/metrics").text
    steps = _metric(text, "prefixserve_engine_steps")
    step = _metric(text, "prefixserve_engine_step_seconds")
    cpu = _metric(text, "prefixserve_engine_step_cpu_seconds")
    assert steps >= 6  # the warm-up's steps are not counted
    # one thread's CPU time within a span of wall time cannot exceed it (1 ms for clock granularity)
    assert 0 < cpu <= step + 1e-3


def test_step_time_the_engine_thread_spends_off_the_cpu_is_not_counted_as_its_cpu(client: TestClient) -> None:
    # a forward that sleeps (as a step does while it waits for the GIL or a device): wall time, not CPU time
    runner = client.app.state.engine.runner
    execute = runner.execute

    def sleepy_execute(batch):
        time.sleep(0.05)
        return execute(batch)

    runner.execute = sleepy_execute
    body = {"prompt": "hello", "max_new_tokens": 3, "ignore_eos": True}
    assert client.post("/v1/generate", json=body).status_code == 200
    text = client.get("/metrics").text
    steps = _metric(text, "prefixserve_engine_steps")
    waited = _metric(text, "prefixserve_engine_step_seconds") - _metric(
        text, "prefixserve_engine_step_cpu_seconds"
    )
    assert steps >= 3 and waited >= 0.9 * 0.05 * steps, (steps, waited)
