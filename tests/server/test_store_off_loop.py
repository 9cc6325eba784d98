"""No store call runs on the event loop's thread: a store that blocks (a paused Redis waits its timeout)
would stall every tenant's requests and streams, not just the one that needed it."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prefix_store.format import Prefix, save_prefix
from prefix_store.local import LocalStore
from server import app as app_module
from server.app import create_app
from server.settings import Settings

ADMIN_KEY = "admin-" + "k" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


LIFECYCLE = {"watch", "close"}  # start-up and shut-down, no request waits on them


class RecordingStore:
    """Wraps a store; notes every method a request calls on a thread that runs an event loop."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.on_loop: list[str] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value) or name in LIFECYCLE:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass  # a worker thread: fine
            else:
                with self._lock:
                    self.on_loop.append(name)
            return value(*args, **kwargs)

        return call


def native(model_dir: Path) -> bytes:
    config = json.loads((model_dir / "config.json").read_text())
    shape = (config["n_layer"], 2, config["n_head"], 3, config["n_embd"] // config["n_head"])
    return save_prefix(Prefix("gpt2", {"decoder": torch.randn(shape)}))


def test_every_store_call_runs_off_the_event_loop(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores: list[RecordingStore] = []

    def recording_store(url: str, *args: Any, **kwargs: Any) -> RecordingStore:
        stores.append(RecordingStore(LocalStore(url)))
        return stores[-1]

    monkeypatch.setattr(app_module, "open_store", recording_store)
    settings = Settings(
        model=str(tiny_gpt2_dir), store=str(tmp_path / "store"), device="cpu", admin_key=ADMIN_KEY
    )
    with TestClient(create_app(settings)) as client:
        key = client.post("/v1/tenants/acme/keys", headers=ADMIN).json()["key"]
        acme = {"authorization": f"Bearer {key}"}
        octet = {"content-type": "application/octet-stream"}
        data = native(tiny_gpt2_dir)
        assert client.put("/v1/prefixes/acme/p", content=data, headers={**acme, **octet}).status_code == 201
        url = "/v1/prefixes/pub/q?public=true"
        assert client.put(url, content=data, headers={**ADMIN, **octet}).status_code == 201
        limits = {"requests_per_minute": 100, "tokens_per_minute": 10_000, "max_concurrent": 4}
        assert client.put("/v1/tenants/acme", json=limits, headers=ADMIN).status_code == 200
        body = {"prompt": "hi", "max_new_tokens": 2}
        for prefix in ("acme/p", "pub/q", "acme/p"):
            assert (
                client.post("/v1/generate", json={**body, "prefix": prefix}, headers=acme).status_code == 200
            )
            streamed = {**body, "prefix": prefix, "stream": True}
            assert client.post("/v1/generate", json=streamed, headers=acme).status_code == 200
        completion = {"model": "acme/p", "prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=completion, headers=acme).status_code == 200
        for path in ("/v1/models", "/v1/prefixes", "/v1/prefixes/acme/p", "/v1/tenants/acme"):
            assert client.get(path, headers=acme).status_code == 200, path
        for path in ("/readyz", "/metrics"):
            assert client.get(path, headers=ADMIN).status_code == 200, path
        assert client.delete("/v1/prefixes/acme/p", headers=acme).status_code == 204
        key_id = key.split("_")[1]
        assert client.delete(f"/v1/tenants/acme/keys/{key_id}", headers=ADMIN).status_code == 204
    assert stores and stores[0].on_loop == [], f"store calls on the event loop: {stores[0].on_loop}"
