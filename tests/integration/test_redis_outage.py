"""A real prefix-serve on its own redis-server, paused (SIGSTOP) and then killed under it: what needs Redis
answers 503 store_unavailable within the store timeout, with one log line; verified keys and resident
prefixes, public ones included, keep being served; after SIGCONT (or a restart) everything works again."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from own_redis import OwnRedis
from serving import running_server

from prefix_store.format import Prefix, save_prefix

ADMIN_KEY = "admin-" + "k" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
STORE_TIMEOUT = 0.5
# A ceiling that tells an answer from a hang (the issue saw none in 200 s), not a speed requirement.
CLIENT_TIMEOUT = 30.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.data_dir.mkdir()
    server.start()
    yield server
    server.resume()
    server.kill()


def native(model_dir: Path, seed: int) -> bytes:
    config = json.loads((model_dir / "config.json").read_text())
    shape = (config["n_layer"], 2, config["n_head"], 4, config["n_embd"] // config["n_head"])
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return save_prefix(Prefix("gpt2", {"decoder": tensor}))


def upload(client: httpx.Client, path: str, data: bytes, headers: dict[str, str]) -> None:
    headers = {**headers, "content-type": "application/octet-stream"}
    response = client.put(f"/v1/prefixes/{path}", content=data, headers=headers)
    assert response.status_code == 201, response.text


def new_key(client: httpx.Client, tenant: str) -> dict[str, str]:
    response = client.post(f"/v1/tenants/{tenant}/keys", headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"authorization": f"Bearer {response.json()['key']}"}


def generate(client: httpx.Client, prefix: str, headers: dict[str, str]) -> httpx.Response:
    body = {"prefix": prefix, "prompt": "hello there", "max_new_tokens": 4, "ignore_eos": True}
    return client.post("/v1/generate", json=body, headers=headers)


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "store_unavailable", response.text


def wait_ready(client: httpx.Client, ready: bool) -> None:
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while (client.get("/readyz").status_code == 200) != ready:
        assert time.monotonic() < deadline, f"/readyz did not turn {'200' if ready else '503'}"
        time.sleep(0.1)


def test_paused_then_stopped_redis(tiny_gpt2_dir: Path, tmp_path: Path, own_redis: OwnRedis) -> None:
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY, "PREFIXSERVE_STORE_TIMEOUT": str(STORE_TIMEOUT)}
    with (
        running_server(tiny_gpt2_dir, own_redis.url, tmp_path / "logs", env=env) as server,
        httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT) as client,
    ):
        acme, beta = new_key(client, "acme"), new_key(client, "beta")
        upload(client, "acme/own", native(tiny_gpt2_dir, 1), acme)
        upload(client, "acme/cold", native(tiny_gpt2_dir, 2), acme)  # never generated: not resident
        upload(client, "shared/pub?public=true", native(tiny_gpt2_dir, 3), ADMIN)
        expected = {}
        for prefix in ("acme/own", "shared/pub"):  # verifies acme's key, makes both prefixes resident
            response = generate(client, prefix, acme)
            assert response.status_code == 200, response.text
            expected[prefix] = response.json()["token_ids"]

        def served_through_the_outage(cold: str) -> None:
            for _ in range(3):
                for prefix, tokens in expected.items():
                    response = generate(client, prefix, acme)
                    assert response.status_code == 200, f"{prefix}: {response.text}"
                    assert response.json()["token_ids"] == tokens
            assert_unavailable(generate(client, "acme/own", beta))  # a key this replica never verified
            assert_unavailable(generate(client, cold, acme))  # a prefix that is not resident
            assert_unavailable(client.get("/v1/prefixes/acme/own", headers=acme))
            wait_ready(client, False)

        own_redis.pause()
        served_through_the_outage("acme/cold")
        log = server.log()
        assert log.count("is unreachable") == 1, log  # one line, not one per request
        own_redis.resume()
        wait_ready(client, True)
        for prefix in ("acme/own", "acme/cold", "shared/pub"):
            response = generate(client, prefix, beta if prefix == "shared/pub" else acme)
            assert response.status_code == 200, f"{prefix}: {response.text}"
        assert generate(client, "shared/pub", beta).json()["token_ids"] == expected["shared/pub"]
        assert "answers again after" in server.log()

        # Redis shut down (its AOF keeps what was written) and started again: the same, and a public
        # prefix that is resident is still served (the change feed is gone; the key grace is 600 s).
        upload(client, "acme/later", native(tiny_gpt2_dir, 4), acme)
        for prefix in expected:
            assert generate(client, prefix, acme).status_code == 200
        own_redis.kill()
        served_through_the_outage("acme/later")
        own_redis.start()
        wait_ready(client, True)
        response = generate(client, "acme/later", acme)
        assert response.status_code == 200, response.text
        assert generate(client, "acme/own", beta).status_code == 404  # beta's key is checked again
