"""Tenants share the batch and nothing else, against a real prefix-serve over HTTP.

- hostile requests (extreme sampling values the API accepts, prefixes at the magnitude bound) run in the
  same steps as PEFT-parity requests: the parity ones stay token-identical to PEFT, the hostile ones get
  2xx or 4xx, never 5xx, and the server is ready afterwards;
- a flood from one tenant does not keep another from being served;
- quotas: max_concurrent, requests_per_minute and tokens_per_minute, the per-minute ones across two
  replicas sharing one Redis.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS
from serving import running_server

from prefix_store.format import Prefix, save_prefix

ADMIN_KEY = "admin-" + "k" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
HUGE = 1e4  # the default PREFIXSERVE_MAX_PREFIX_VALUE: the largest magnitude an upload may hold


def tenant_key(client: httpx.Client, tenant: str) -> dict[str, str]:
    response = client.post(f"/v1/tenants/{tenant}/keys", headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"authorization": f"Bearer {response.json()['key']}"}


def native(
    model_dir: Path, num_tokens: int, fill: float | None = None, seed: int = 0, template=None
) -> bytes:
    config = json.loads((model_dir / "config.json").read_text())
    layers, heads, width = config["n_layer"], config["n_head"], config["n_embd"]
    shape = (layers, 2, heads, num_tokens, width // heads)
    if fill is None:
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    else:  # alternating signs: the largest keys and values both ways
        tensor = torch.full(shape, fill) * (torch.arange(shape[-1]) % 2 * 2 - 1)
    return save_prefix(Prefix("gpt2", {"decoder": tensor}, prompt_template=template))


def put_native(client: httpx.Client, prefix_id: str, data: bytes, headers: dict) -> httpx.Response:
    return client.put(
        f"/v1/prefixes/{prefix_id}",
        content=data,
        headers={**headers, "content-type": "application/octet-stream"},
    )


HOSTILE_GENERATE = [
    {"temperature": 1e-40},
    {"temperature": 5e-324},
    {"temperature": 1e-300, "top_p": 1e-300},
    {"temperature": 100, "top_k": 1_000_000},
    {"temperature": 1e-38, "top_k": 1, "seed": 2**63 - 1},
    {"temperature": 0.7, "top_p": 5e-324, "seed": 0},
    {"temperature": 1e-40, "stream": True},
    {"ignore_eos": True, "stop": ["x" * 1000] * 16},
]
# vLLM's extensions at their limits: min_tokens = max_tokens (24) holding off EOS and many stop token ids
HOSTILE_VLLM = [
    {"min_tokens": 24, "stop_token_ids": list(range(64)), "stop": None, "repetition_penalty": 100},
    {
        "min_tokens": 24,
        "stop": ["e", " "],
        "include_stop_str_in_output": True,
        "top_k": -1,
        "temperature": 1e-40,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    },
]
HOSTILE_COMPLETIONS = [
    {"temperature": 1e-45},
    {"temperature": 1e-40, "top_p": 1e-300, "stream": True},
    *HOSTILE_VLLM,
]


async def _mixed_run(url: str, good: dict, evil: dict, parity_jobs, hostile_prefixes) -> tuple[list, list]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def parity(prefix_id: str | None, prompt: str) -> list[int]:
            body = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            response = await client.post("/v1/generate", json=body, headers=good)
            assert response.status_code == 200, response.text
            return response.json()["token_ids"]

        async def hostile_generate(prefix_id: str | None, extra: dict) -> tuple[int, str]:
            body = {"prefix": prefix_id, "prompt": "the quick brown fox", "max_new_tokens": 24, **extra}
            if extra.get("stream"):
                async with client.stream("POST", "/v1/generate", json=body, headers=evil) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    return response.status_code, text
            response = await client.post("/v1/generate", json=body, headers=evil)
            return response.status_code, response.text

        async def hostile_completion(prefix_id: str, extra: dict) -> tuple[int, str]:
            body = {"model": prefix_id, "prompt": ["hello", "world"], "max_tokens": 24, **extra}
            if extra.get("stream"):
                async with client.stream("POST", "/v1/completions", json=body, headers=evil) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    return response.status_code, text
            response = await client.post("/v1/completions", json=body, headers=evil)
            return response.status_code, response.text

        async def hostile_chat(prefix_id: str, extra: dict) -> tuple[int, str]:
            messages = [{"role": "user", "content": "the quick brown fox"}]
            body = {"model": prefix_id, "messages": messages, "max_tokens": 24, "n": 2, **extra}
            if extra.get("stream"):
                async with client.stream("POST", "/v1/chat/completions", json=body, headers=evil) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    return response.status_code, text
            response = await client.post("/v1/chat/completions", json=body, headers=evil)
            return response.status_code, response.text

        hostile = [hostile_generate(p, extra) for p in hostile_prefixes for extra in HOSTILE_GENERATE]
        hostile += [
            hostile_completion(p, extra) for p in hostile_prefixes if p for extra in HOSTILE_COMPLETIONS
        ]
        hostile += [hostile_chat(p, extra) for p in hostile_prefixes if p for extra in HOSTILE_VLLM]
        results = await asyncio.gather(*hostile, *(parity(*job) for job in parity_jobs))
        return list(results[: len(hostile)]), list(results[len(hostile) :])


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_hostile_tenant_in_the_same_steps_changes_nothing_for_others(peft_case, tmp_path: Path):
    kind, model_dir, adapters, expected = peft_case
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    args = ["--max-num-seqs", "32"]
    with running_server(model_dir, str(tmp_path / "store"), tmp_path, env=env, args=args) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        good, evil = tenant_key(client, "t"), tenant_key(client, "evil")
        for prefix_id, path in adapters.items():
            files = {
                "adapter_model": ("m", (path / "adapter_model.safetensors").read_bytes()),
                "adapter_config": ("c", (path / "adapter_config.json").read_bytes()),
            }
            assert client.put(f"/v1/prefixes/{prefix_id}", files=files, headers=good).status_code == 201

        # the upload bound: 3e38 is finite but refused; values at the bound are accepted
        too_big = put_native(client, "evil/overflow", native(model_dir, 4, fill=3e38), evil)
        assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "value_out_of_range"
        for name, num_tokens in (("huge", 4), ("huge-long", 64)):
            data = native(model_dir, num_tokens, fill=HUGE, template=" {source}")  # chat can use it
            response = put_native(client, f"evil/{name}", data, evil)
            assert response.status_code == 201, response.text

        parity_jobs = [(p, PROMPTS[i]) for i in range(len(PROMPTS)) for p in [None, *adapters]]
        hostile, got = asyncio.run(
            _mixed_run(server.url, good, evil, parity_jobs, [None, "evil/huge", "evil/huge-long"])
        )
        for (prefix_id, prompt), tokens in zip(parity_jobs, got, strict=True):
            assert tokens == expected[prefix_id][PROMPTS.index(prompt)], (prefix_id, prompt)
        for status, text in hostile:
            assert status < 500 and "engine_error" not in text and "internal_error" not in text, text
        chats = hostile[-2 * len(HOSTILE_VLLM) :]  # the prefixes' prompt template took the message
        assert all(status in (200, 422) for status, _ in chats), chats
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert 'status="5' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]


def test_flooding_tenant_does_not_starve_another(tiny_gpt2_dir: Path, tmp_path: Path):
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    args = ["--max-num-seqs", "4", "--max-queue", "16"]
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path, env=env, args=args) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        flood, light = tenant_key(client, "flood"), tenant_key(client, "light")
        stop = threading.Event()
        flood_status: list[int] = []

        def flooder() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                while not stop.is_set():  # each answered request is sent again
                    body = {"prompt": "the quick brown fox", "max_new_tokens": 48, "ignore_eos": True}
                    flood_status.append(c.post("/v1/generate", json=body, headers=flood).status_code)

        threads = [threading.Thread(target=flooder) for _ in range(40)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and flood_status.count(429) < 5:
                time.sleep(0.1)
            assert 429 in flood_status, "the flood never filled the queue"
            for i in range(6):
                body = {"prompt": f"hello {i}", "max_new_tokens": 8}
                response = client.post("/v1/generate", json=body, headers=light)
                assert response.status_code == 200, (i, response.text)
            refusals = client.get("/metrics", headers=ADMIN).text
            assert 'prefixserve_tenant_refusals_total{reason="tenant_queue_full",tenant="flood"}' in refusals
            assert 'tenant="light"' not in "\n".join(
                line for line in refusals.splitlines() if line.startswith("prefixserve_tenant_refusals")
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert client.get("/readyz").status_code == 200


@pytest.fixture
def redis_url() -> str:
    return f"redis://127.0.0.1:6379/0?namespace=quota{secrets.token_hex(4)}"


def test_quotas_hold_across_two_replicas(tiny_gpt2_dir: Path, tmp_path: Path, redis_url: str):
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    body = {"prompt": "the quick brown fox", "max_new_tokens": 4}
    with (
        running_server(tiny_gpt2_dir, redis_url, tmp_path / "a", env=env) as one,
        running_server(tiny_gpt2_dir, redis_url, tmp_path / "b", env=env) as two,
    ):
        c1, c2 = httpx.Client(base_url=one.url, timeout=60), httpx.Client(base_url=two.url, timeout=60)
        key, other = tenant_key(c1, "q"), tenant_key(c1, "other")
        settings = c1.put("/v1/tenants/q", json={"requests_per_minute": 3}, headers=ADMIN)
        assert settings.status_code == 200, settings.text
        assert settings.json()["requests_per_minute"] == 3 and settings.json()["weight"] == 1.0
        for client in (c1, c2, c1):
            assert client.post("/v1/generate", json=body, headers=key).status_code == 200
        refused = c2.post("/v1/generate", json=body, headers=key)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert c2.post("/v1/generate", json=body, headers=other).status_code == 200  # others unaffected
        shown = c2.get("/v1/tenants/q", headers=key)
        assert shown.status_code == 200 and shown.json()["usage"]["requests_last_minute"] >= 3
        assert c2.get("/v1/tenants/q", headers=other).status_code == 404

        # tokens per minute: counted as they are served (prompt + generated), across replicas
        assert c1.put("/v1/tenants/other", json={"tokens_per_minute": 10}, headers=ADMIN).status_code == 200
        deadline = time.monotonic() + 30
        while c1.get("/v1/tenants/other", headers=ADMIN).json()["usage"]["tokens_last_minute"] < 10:
            assert time.monotonic() < deadline, "the served tokens were never counted"
            time.sleep(0.1)
        refused = c2.post("/v1/generate", json=body, headers=other)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"

        # null clears a quota
        cleared = c2.put("/v1/tenants/q", json={"requests_per_minute": None}, headers=ADMIN)
        assert cleared.json()["requests_per_minute"] is None
        assert c1.post("/v1/generate", json=body, headers=key).status_code == 200


def test_max_concurrent_and_tenant_settings_validation(tiny_gpt2_dir: Path, tmp_path: Path):
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    args = ["--max-num-seqs", "1"]
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path, env=env, args=args) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        key = tenant_key(client, "c")
        assert client.put("/v1/tenants/c", json={"max_concurrent": 1}, headers=ADMIN).status_code == 200
        long = {"prompt": "hi", "max_new_tokens": 120, "ignore_eos": True, "stream": True}
        with ExitStack() as stack:
            for _ in range(4):  # the admin's requests keep the one slot busy for a while
                stack.enter_context(client.stream("POST", "/v1/generate", json=long, headers=ADMIN))
            first = stack.enter_context(client.stream("POST", "/v1/generate", json=long, headers=key))
            assert first.status_code == 200  # queued (or running): the tenant's one request
            second = client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=key)
            assert second.status_code == 429 and second.json()["error"]["code"] == "quota_exceeded"
            assert int(second.headers["retry-after"]) >= 1
        for bad in ({"weight": 0}, {"weight": "NaN"}, {"max_concurrent": 0}, {"nope": 1}, {"weight": 1e9}):
            response = client.put("/v1/tenants/c", json=bad, headers=ADMIN)
            assert response.status_code == 422, (bad, response.text)
        assert client.put("/v1/tenants/c", json={"weight": 2}, headers=key).status_code == 403
        shown = client.get("/v1/tenants/c", headers=ADMIN).json()
        assert shown["max_concurrent"] == 1 and shown["usage"]["requests_last_minute"] >= 1


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_burst_cannot_slip_under_requests_per_minute(tiny_gpt2_dir: Path, tmp_path: Path, store: str):
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    url = (
        str(tmp_path / "store")
        if store == "local"
        else f"redis://127.0.0.1:6379/0?namespace=b{secrets.token_hex(4)}"
    )
    with running_server(tiny_gpt2_dir, url, tmp_path, env=env) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        key = tenant_key(client, "burst")
        assert (
            client.put("/v1/tenants/burst", json={"requests_per_minute": 2}, headers=ADMIN).status_code == 200
        )
        for bad in ({"weight": True}, {"max_concurrent": "3"}, {"weight": "1e3"}):
            assert client.put("/v1/tenants/burst", json=bad, headers=ADMIN).status_code == 422, bad

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                body = {"prompt": "hi", "max_new_tokens": 2}
                responses = await asyncio.gather(
                    *(c.post("/v1/generate", json=body, headers=key) for _ in range(12))
                )
                return [r.status_code for r in responses]

        statuses = asyncio.run(burst())
        assert sorted(statuses) == [200, 200] + [429] * 10, statuses
        assert client.get("/v1/tenants/burst", headers=key).json()["usage"]["requests_last_minute"] == 2
