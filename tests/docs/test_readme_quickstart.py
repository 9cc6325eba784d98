"""The README's first steps, run as written: what `make serve` starts (server.demo, the demo backbone and its
prefixes) answers the README's first curl with the answer the README shows. The commands are read from the
README's code blocks, so the page cannot drift from what the server does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import ROOT, ServerProcess, free_port

README = ROOT / "README.md"
DEMO_MODEL = ROOT / "models" / "demo-gpt2"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def first_curl(text: str) -> str:
    """The first curl of the README's bash blocks, continuation lines joined."""
    for block in code_blocks(text, "bash"):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            if line.lstrip().startswith("curl "):
                return line.strip()
    raise AssertionError("no curl in the README's bash blocks")


def shown_answer(text: str) -> dict:
    return json.loads(code_blocks(text, "json")[0])


def make_serve_target() -> str:
    makefile = (ROOT / "Makefile").read_text()
    return re.search(r"^serve:.*\n\t(.+)$", makefile, re.M).group(1)


def start_demo_server(store: Path, log_dir: Path, ready_timeout: float = 300.0) -> ServerProcess:
    """`make serve` without make (which would set up .venv): `python -m server.demo` on a free port."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "demo-server.log"
    command = [
        sys.executable,
        "-m",
        "server.demo",
        "--store",
        str(store),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **_inherited_env()}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process, log_path)
    deadline = time.monotonic() + ready_timeout  # a ceiling, not a timing assertion
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server.demo exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server.demo did not become ready:\n{server.log()}")


def _inherited_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}


def test_make_serve_runs_the_demo_server() -> None:
    assert "make serve" in code_blocks(README.read_text(), "bash")[0]
    assert make_serve_target().endswith("-m server.demo")


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").is_file(), reason="the demo backbone is not in this checkout"
)
def test_readme_first_curl_gives_the_answer_the_readme_shows(tmp_path: Path) -> None:
    text = README.read_text()
    curl, shown = first_curl(text), shown_answer(text)
    assert "localhost:8000" in curl
    server = start_demo_server(tmp_path / "store", tmp_path / "logs")
    try:
        run = subprocess.run(
            ["bash", "-c", curl.replace("localhost:8000", f"127.0.0.1:{server.port}")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    for field in ("prefix", "text", "token_ids", "finish_reason", "usage"):
        assert answer[field] == shown[field], (
            f"{field}: the README shows {shown[field]!r}, the server says {answer[field]!r}"
        )
