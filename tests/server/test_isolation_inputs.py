"""The smaller tenant-isolation defects, each against a real prefix-serve: a clear 4xx (never a 500), nothing
stored that no request could use, visibility kept on re-upload, the same limits on both endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from edge_support import ADMIN_KEY, assert_error, native_prefix, peft_adapter, put_native
from serving import ServerProcess, running_server

from prefix_store.format import Prefix, save_prefix

POSITIONS = 128  # the tiny GPT-2's n_positions


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("isolation-inputs")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as served:
        yield served


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tenant(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    key = admin.post("/v1/tenants/t/keys").json()["key"]
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
        yield c


def _stored(admin: httpx.Client) -> list[str]:
    return [m["id"] for m in admin.get("/v1/prefixes").json()["prefixes"]]


def _peft_parts(config: bytes, weights: bytes) -> dict:
    return {"adapter_model": ("m", weights), "adapter_config": ("c", config)}


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (None, "num_virtual_tokens"),  # 1e400
        (None, "num_layers"),  # "2"
    ],
    ids=["deep-nesting", "huge-float", "string-int"],
)
def test_hostile_adapter_config_is_422(admin, tiny_gpt2_dir: Path, tmp_path: Path, config, needle):
    good_config, weights = peft_adapter(tiny_gpt2_dir, tmp_path / "adapter")
    if config is None:
        text = good_config.decode()
        parsed = json.loads(text)
        if needle == "num_virtual_tokens":
            text = text.replace(
                f'"num_virtual_tokens": {parsed["num_virtual_tokens"]}', '"num_virtual_tokens": 1e400'
            )
        else:
            parsed["num_layers"] = str(parsed["num_layers"])
            text = json.dumps(parsed)
        config = text.encode()
    before = _stored(admin)
    response = admin.put("/v1/prefixes/t/hostile", files=_peft_parts(config, weights))
    body = assert_error(response, 422, "invalid_adapter_config")
    assert needle in body["error"]["message"]
    assert _stored(admin) == before


@pytest.mark.parametrize("num_tokens", [POSITIONS - 1, POSITIONS])
def test_prefix_with_no_room_for_a_prompt_is_refused_at_upload(admin, num_tokens: int):
    response = put_native(admin, "t/too-long", native_prefix(num_tokens))
    assert_error(response, 422, "no_room_for_prompt")
    assert "t/too-long" not in _stored(admin)
    # the longest that leaves room for one prompt token and one answer token is accepted and works
    assert put_native(admin, "t/longest", native_prefix(POSITIONS - 2)).status_code == 201
    response = admin.post("/v1/generate", json={"prefix": "t/longest", "prompt": "a", "max_new_tokens": 1})
    assert response.status_code == 200, response.text
    assert admin.delete("/v1/prefixes/t/longest").status_code == 204


def test_template_with_no_room_for_a_prompt_is_refused_at_upload(admin):
    tensor = torch.randn(2, 2, 4, 4, 16)
    template = "word " * 20_000 + "{source}"
    response = put_native(admin, "t/wordy", save_prefix(Prefix("gpt2", {"decoder": tensor}, template)))
    body = assert_error(response, 422, "no_room_for_prompt")
    assert "template" in body["error"]["message"]
    assert "t/wordy" not in _stored(admin)


def test_values_beyond_the_bound_are_refused(admin):
    response = put_native(admin, "t/huge", native_prefix(fill=3e38))
    body = assert_error(response, 422, "value_out_of_range")
    assert "PREFIXSERVE_MAX_PREFIX_VALUE" in body["error"]["message"]
    assert put_native(admin, "t/at-bound", native_prefix(fill=1e4)).status_code == 201
    assert admin.delete("/v1/prefixes/t/at-bound").status_code == 204


def test_admin_reupload_keeps_a_public_prefix_public(admin, tenant):
    assert put_native(admin, "shared/demo", native_prefix(seed=1), public="true").status_code == 201
    replaced = put_native(admin, "shared/demo", native_prefix(seed=2))
    assert replaced.status_code == 200 and replaced.json()["public"] is True
    body = {"prefix": "shared/demo", "prompt": "hi", "max_new_tokens": 2}
    assert tenant.post("/v1/generate", json=body).status_code == 200
    made_private = put_native(admin, "shared/demo", native_prefix(seed=3), public="false")
    assert made_private.json()["public"] is False
    assert tenant.post("/v1/generate", json=body).status_code == 404
    assert admin.delete("/v1/prefixes/shared/demo").status_code == 204


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_values_are_named(admin, endpoint: str, value: str):
    head = '{"prompt": "hi"' if endpoint == "/v1/generate" else '{"prompt": "hi", "model": "x"'
    for field in ("temperature", "top_p"):
        content = f'{head}, "{field}": {value}}}'
        response = admin.post(endpoint, content=content, headers={"content-type": "application/json"})
        body = assert_error(response, 422, "invalid_request")
        assert field in body["error"]["message"] and "finite" in body["error"]["message"], body


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions"])
@pytest.mark.parametrize(
    "stop",
    [["x"] * 1000, ["x" * 5_000]],
    ids=["1000-strings", "long-string"],
)
def test_stop_strings_have_the_same_limits_on_both_endpoints(admin, endpoint: str, stop):
    body = {"prompt": "hi", "stop": stop}
    if endpoint == "/v1/completions":
        body["model"] = "gpt2-2048"  # whatever the name: the body is refused first
    body = assert_error(admin.post(endpoint, json=body), 422, "invalid_request")
    assert "stop" in body["error"]["message"]


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions", "/v1/tenants/t"])
def test_deeply_nested_json_is_invalid_json(admin, endpoint: str):
    content = "[" * 100_000 + "]" * 100_000
    method = admin.put if endpoint.startswith("/v1/tenants") else admin.post
    response = method(endpoint, content=content, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_json")
    assert admin.get("/readyz").status_code == 200
