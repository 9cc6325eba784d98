"""Fuzz the OpenAPI document with schemathesis against a real prefix-serve: whatever comes in, never a 5xx.

The server runs with auth off (every caller is admin, so every operation is reachable), which must log a
loud warning. Bounded: a fixed number of examples per operation, derandomized (same cases every run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from edge_support import assert_error, native_prefix, put_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serving import ServerProcess, running_server

from server.app import create_app
from server.settings import Settings

PREFIX = "fuzz/p"
EXAMPLES_PER_OPERATION = 25
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    args = ["--max-body-bytes", str(1 << 20), "--request-timeout", "20"]
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", args=args) as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            assert put_native(client, PREFIX, native_prefix()).status_code == 201
        yield served


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _load_schema():
    """The document the server serves, built without loading a model (create_app loads nothing until it runs)."""
    document = create_app(Settings()).openapi()
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return loaded


schema = _load_schema()


def test_auth_off_logs_a_loud_warning(server: ServerProcess) -> None:
    log = server.log()
    assert "WARNING" in log and "AUTH IS OFF" in log and "PREFIXSERVE_ADMIN_KEY" in log


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_server_errors(case, server: ServerProcess) -> None:
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith(("application/json", "text/")), response.headers
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"code", "message"}, body


@given(data=st.binary(max_size=4096) | st.lists(st.integers(0, 1 << 16), min_size=1, max_size=8))
@FUZZ_SETTINGS
def test_upload_bytes_never_crash(client: httpx.Client, data) -> None:
    """Random bytes, and a valid native file with a few bytes flipped (header and tensor data alike)."""
    if isinstance(data, list):
        valid = bytearray(native_prefix())
        for index in data:
            valid[index % len(valid)] ^= 0xFF
        data = bytes(valid)
    response = put_native(client, "fuzz/upload", data)
    assert response.status_code in (200, 201, 422), response.text
    if response.status_code >= 400:
        assert_error(response, 422)


def test_short_requests_never_lose_their_output(client: httpx.Client) -> None:
    """A request that finishes before its handler starts reading must still return its tokens.

    The engine thread used to drop a finished request's output queue before the handler had looked it up:
    with a tiny backbone, about one request in a hundred answered 500."""
    for _ in range(150):
        response = client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 1, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert len(response.json()["token_ids"]) == 1


def test_still_healthy_and_no_unhandled_errors(server: ServerProcess, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    response = client.post("/v1/generate", json={"prefix": PREFIX, "prompt": "hello", "max_new_tokens": 3})
    assert response.status_code == 200, response.text
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
