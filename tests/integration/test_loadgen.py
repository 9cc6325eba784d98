"""A standard load generator, GuideLLM (a dev extra), pointed at a real prefix-serve with `model` = a prefix id:
a short benchmark on each OpenAI endpoint records no failed request. It sends what such tools send (GET
/health, GET /v1/models, vLLM's ignore_eos, stop null, stream_options.continuous_usage_stats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from serving import ServerProcess, running_server

from prefix_store.format import Prefix, save_prefix

ADMIN_KEY = "loadgen-admin-key-0123456789"
PREFIX = "bench/e2e"
NUM_REQUESTS = 6
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def served(
    tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    root = tmp_path_factory.mktemp("loadgen")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as server:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        tensor = torch.randn((2, 2, 4, 4, 16), generator=torch.Generator().manual_seed(0))
        data = save_prefix(Prefix("gpt2", {"decoder": tensor}, prompt_template=" {source} ="))
        headers = {**admin, "content-type": "application/octet-stream"}
        assert (
            httpx.put(f"{server.url}/v1/prefixes/{PREFIX}", content=data, headers=headers).status_code == 201
        )
        key = httpx.post(f"{server.url}/v1/tenants/bench/keys", headers=admin).json()["key"]
        yield server, key


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_has_no_failed_request(
    served: tuple[ServerProcess, str], tiny_gpt2_dir: Path, tmp_path: Path, endpoint: str
) -> None:
    server, key = served
    report = tmp_path / "guidellm.json"
    backend = f"kind=openai_http,target={server.url},model={PREFIX},request_format={endpoint},api_key={key}"
    command = [
        *(sys.executable, "-m", "guidellm", "run"),
        *("--backend", backend),
        *("--profile", "kind=concurrent,streams=3"),
        *("--data", f"kind=synthetic_text,prompt_tokens=16,output_tokens={OUTPUT_TOKENS}"),
        *("--tokenizer", f"kind=hf_auto,model={tiny_gpt2_dir}"),
        *("--constraint", f"kind=max_requests,count={NUM_REQUESTS}"),
        *("--output", f"kind=json,path={report}"),
        "--disable-console",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": NUM_REQUESTS, "errored": 0, "incomplete": 0, "total": NUM_REQUESTS}
    outputs = benchmark["metrics"]["output_token_count"]["successful"]
    assert outputs["min"] == outputs["max"] == OUTPUT_TOKENS  # ignore_eos honoured: the lengths it asked for
