"""Start a real `prefix-serve` process for integration tests and talk to it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu"  # prefix-serve's --device; `pytest --device cuda` sets it (conftest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    model_dir: Path,
    store: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    ready_timeout: float = 300.0,  # a ceiling: on a loaded 2-core box, importing torch alone can take a minute
    checkout: Path = ROOT,
) -> ServerProcess:
    """Launch `python -m server` from `checkout` (this repository unless another is given, e.g. a worktree of an
    older commit for a benchmark) and wait until /readyz answers 200."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"prefix-serve-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    full_env.update(env or {})
    command = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(model_dir),
        "--store",
        store,
        "--port",
        str(port),
        "--device",
        DEVICE,
        *(["--dtype", "float32"] if DEVICE != "cpu" else []),  # exact in float32; `auto` is bfloat16 on CUDA
        *(args or []),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=checkout, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefix-serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"prefix-serve did not become ready in {ready_timeout} s:\n{server.log()}")


@contextmanager
def running_server(model_dir: Path, store: str, log_dir: Path, **kwargs) -> Iterator[ServerProcess]:
    server = start_server(model_dir, store, log_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def upload_peft(client: httpx.Client, prefix_id: str, path: Path) -> httpx.Response:
    files = {
        "adapter_model": ("adapter_model.safetensors", (path / "adapter_model.safetensors").read_bytes()),
        "adapter_config": ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
    }
    return client.put(f"/v1/prefixes/{prefix_id}", files=files)


class BackgroundStream:
    """A streamed POST /v1/generate read on its own thread, for requests that must be in flight while the
    test does something else: `first_token` is set once a token arrived, `result()` waits for the end."""

    def __init__(self, url: str, body: dict, headers: dict[str, str] | None = None, timeout: float = 120):
        import threading

        self.url, self.body, self.headers, self.timeout = (
            url,
            {**body, "stream": True},
            headers or {},
            timeout,
        )
        self.first_token = threading.Event()
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.finished_at: float | None = None  # time.monotonic() when the final event arrived
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import json

        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/generate", json=self.body, headers=self.headers, timeout=self.timeout
            ) as response:
                if response.status_code != 200:
                    self.error = f"{response.status_code}: {response.read().decode(errors='replace')}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.error = json.dumps(event["error"])
                        return
                    if event.get("token_id") is not None:
                        self.tokens.append(event["token_id"])
                        self.first_token.set()
                    self.text += event.get("text", "")
                    if event.get("finish_reason"):
                        self.finish_reason = event["finish_reason"]
                        self.finished_at = time.monotonic()
        except Exception as exc:  # reported by result()
            self.error = repr(exc)
        finally:
            self.first_token.set()  # never leave a waiter hanging; result() reports what happened

    def result(self) -> list[int]:
        self._thread.join(self.timeout)
        assert not self._thread.is_alive(), f"stream still running after {self.timeout} s"
        assert self.error is None, self.error
        assert self.finish_reason is not None, "the stream ended without a final event"
        return self.tokens
