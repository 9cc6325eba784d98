"""Bad input against a real prefix-serve: each is a 4xx JSON error, nothing is stored, the service stays healthy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from edge_support import ADMIN_KEY, assert_error, native_prefix, peft_adapter, put_native, raw_native
from safetensors.torch import save as st_save
from serving import ServerProcess, running_server
from tiny_models import build_gpt2

from prefix_store.format import Prefix, save_prefix

MAX_BODY_BYTES = 200_000
MAX_PREFIX_TOKENS = 16
OK_ID = "t/ok"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bad-input")
    args = ["--max-body-bytes", str(MAX_BODY_BYTES), "--max-prefix-tokens", str(MAX_PREFIX_TOKENS)]
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env, args=args) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        assert put_native(c, OK_ID, native_prefix()).status_code == 201
        yield c


@pytest.fixture(autouse=True)
def healthy_and_nothing_stored(client: httpx.Client) -> Iterator[None]:
    """After every case: only t/ok is stored, /healthz answers, and a generation with t/ok works."""
    yield
    assert [m["id"] for m in client.get("/v1/prefixes").json()["prefixes"]] == [OK_ID]
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.post("/v1/generate", json={"prefix": OK_ID, "prompt": "hello", "max_new_tokens": 3})
    assert response.status_code == 200 and len(response.json()["token_ids"]) == 3, response.text


def _safetensors_with_header(header: bytes, payload: bytes = b"\0" * 16) -> bytes:
    return len(header).to_bytes(8, "little") + header + payload


def _valid() -> bytes:
    return native_prefix()


NATIVE_CASES = {
    "garbage": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "invalid_safetensors"),
    "empty": (b"", "invalid_safetensors"),
    "truncated": (_valid()[: len(_valid()) // 2], "invalid_safetensors"),
    "header_len_huge": ((2**62).to_bytes(8, "little") + b"{}", "invalid_safetensors"),
    "header_not_json": (_safetensors_with_header(b"{not json at all"), "invalid_safetensors"),
    "header_bad_offsets": (
        _safetensors_with_header(
            b'{"decoder":{"dtype":"F32","shape":[2,2,4,4,16],"data_offsets":[0,99999]}}'
        ),
        "invalid_safetensors",
    ),
    "header_bad_dtype": (
        _safetensors_with_header(b'{"decoder":{"dtype":"NOPE","shape":[4],"data_offsets":[0,16]}}'),
        "invalid_safetensors",
    ),
    "plain_safetensors": (st_save({"decoder": torch.zeros(2, 2, 4, 4, 16)}), "not_a_prefix_file"),
    "nan": (native_prefix(fill=float("nan")), "non_finite_values"),
    "inf": (native_prefix(fill=float("inf")), "non_finite_values"),
    "int32": (raw_native({"decoder": torch.ones(2, 2, 4, 4, 16, dtype=torch.int32)}), "wrong_dtype"),
    "too_long": (native_prefix(MAX_PREFIX_TOKENS + 1), "prefix_too_long"),
    "wrong_num_layers": (native_prefix(num_layers=3), "shape_mismatch"),
    "wrong_num_heads": (native_prefix(num_heads=2, head_dim=32), "shape_mismatch"),
    "wrong_head_dim": (native_prefix(head_dim=8), "shape_mismatch"),
    "bart_prefix": (
        save_prefix(
            Prefix("bart", {"encoder": torch.zeros(2, 2, 4, 4, 16), "decoder": torch.zeros(2, 2, 4, 4, 16)})
        ),
        "wrong_model_type",
    ),
}


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_bad_native_file_is_refused(client: httpx.Client, case: str) -> None:
    data, code = NATIVE_CASES[case]
    assert_error(put_native(client, "t/bad", data), 422, code)
    assert_error(client.get("/v1/prefixes/t/bad"), 404, "prefix_not_found")


def test_longest_allowed_prefix_is_accepted(client: httpx.Client) -> None:
    """The boundary of the case above: exactly --max-prefix-tokens is fine."""
    response = put_native(client, "t/edge", native_prefix(MAX_PREFIX_TOKENS))
    assert response.status_code == 201 and response.json()["num_virtual_tokens"] == MAX_PREFIX_TOKENS
    assert client.delete("/v1/prefixes/t/edge").status_code == 204


# -- PEFT adapters --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    root = tmp_path_factory.mktemp("peft-adapters")
    three_layers = build_gpt2(root / "gpt2-3-layers", n_layer=3)
    narrow = build_gpt2(root / "gpt2-32-wide", n_embd=32)
    return {
        "matching": peft_adapter(tiny_gpt2_dir, root / "matching"),
        "wrong_num_layers": peft_adapter(three_layers, root / "three"),
        "wrong_token_dim": peft_adapter(narrow, root / "narrow"),
    }


def _put_peft(client: httpx.Client, prefix_id: str, parts: dict[str, bytes]) -> httpx.Response:
    files = {name: (name, data, "application/octet-stream") for name, data in parts.items()}
    return client.put(f"/v1/prefixes/{prefix_id}", files=files)


def test_matching_peft_adapter_is_accepted(client: httpx.Client, adapters) -> None:
    config, weights = adapters["matching"]
    response = _put_peft(client, "t/peft", {"adapter_config": config, "adapter_model": weights})
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "peft"
    assert client.delete("/v1/prefixes/t/peft").status_code == 204


@pytest.mark.parametrize("case", ["wrong_num_layers", "wrong_token_dim"])
def test_peft_adapter_for_another_backbone_is_refused(client: httpx.Client, adapters, case: str) -> None:
    config, weights = adapters[case]
    body = assert_error(
        _put_peft(client, "t/peft", {"adapter_config": config, "adapter_model": weights}), 422
    )
    assert body["error"]["code"] == "shape_mismatch"


def _peft_case(adapters, case: str) -> dict[str, bytes]:
    config, weights = adapters["matching"]
    cfg = json.loads(config)
    return {
        "missing_config": {"adapter_model": weights},
        "missing_model": {"adapter_config": config},
        "config_not_json": {"adapter_config": b"\xff{", "adapter_model": weights},
        "lora_config": {
            "adapter_config": json.dumps({**cfg, "peft_type": "LORA"}).encode(),
            "adapter_model": weights,
        },
        "config_lies": {
            "adapter_config": json.dumps({**cfg, "num_layers": 7}).encode(),
            "adapter_model": weights,
        },
        "weights_garbage": {"adapter_config": config, "adapter_model": b"garbage" * 10},
        "weights_truncated": {"adapter_config": config, "adapter_model": weights[: len(weights) // 3]},
    }[case]


PEFT_CODES = {
    "missing_config": "missing_part",
    "missing_model": "missing_part",
    "config_not_json": "invalid_adapter_config",
    "lora_config": "unsupported_adapter",
    "config_lies": "shape_mismatch",
    "weights_garbage": "invalid_safetensors",
    "weights_truncated": "invalid_safetensors",
}


@pytest.mark.parametrize("case", sorted(PEFT_CODES))
def test_bad_peft_upload_is_refused(client: httpx.Client, adapters, case: str) -> None:
    assert_error(_put_peft(client, "t/peft", _peft_case(adapters, case)), 422, PEFT_CODES[case])


def test_multipart_without_boundary_is_refused(client: httpx.Client) -> None:
    response = client.put(
        "/v1/prefixes/t/peft", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "image/png"])
def test_wrong_content_type_is_415(client: httpx.Client, content_type: str) -> None:
    response = client.put("/v1/prefixes/t/bad", content=_valid(), headers={"content-type": content_type})
    assert_error(response, 415, "unsupported_media_type")


# -- ids ------------------------------------------------------------------------------------------------------
BAD_ID_PATHS = [
    "/v1/prefixes/t/..",  # httpx would normalise an unescaped ..: sent escaped below
    "/v1/prefixes/t/%2E%2E",
    "/v1/prefixes/%2E%2E/ok",
    "/v1/prefixes/t/a%2F..",
    "/v1/prefixes/a%2F../ok",
    "/v1/prefixes/t/a%20b",
    "/v1/prefixes/t/" + "x" * 65,
    "/v1/prefixes/" + "x" * 65 + "/ok",
    "/v1/prefixes/t/.hidden",
    "/v1/prefixes/t/-dash",
    "/v1/prefixes/t/a%00b",
    "/v1/prefixes/t/%C3%A9",
    "/v1/prefixes/t/a/b",
]


@pytest.mark.parametrize("path", BAD_ID_PATHS)
def test_bad_or_traversal_ids_are_refused(client: httpx.Client, server: ServerProcess, path: str) -> None:
    raw = path.replace("/..", "/%2E%2E") if path.endswith("/..") else path
    for method in ("PUT", "GET", "DELETE"):
        content = _valid() if method == "PUT" else None
        request = client.build_request(method, raw, content=content)
        request.url = httpx.URL(server.url + raw)  # keep the escapes exactly as written
        response = client.send(request)
        assert_error(response, response.status_code)
        assert response.status_code in (400, 404, 405, 422), (method, path, response.text)


def test_name_of_64_chars_is_fine(client: httpx.Client) -> None:
    name = "x" * 64
    assert put_native(client, f"t/{name}", _valid()).status_code == 201
    assert client.delete(f"/v1/prefixes/t/{name}").status_code == 204


@pytest.mark.parametrize("prefix", ["", "..", "t", "t/ok/extra", "../t/ok", "t/a b", "t/" + "x" * 65])
def test_bad_prefix_id_in_generate(client: httpx.Client, prefix: str) -> None:
    response = client.post("/v1/generate", json={"prefix": prefix, "prompt": "hi", "max_new_tokens": 2})
    assert_error(response, 400, "invalid_prefix_id")


def test_unknown_prefix_is_404(client: httpx.Client) -> None:
    response = client.post("/v1/generate", json={"prefix": "t/nothing", "prompt": "hi"})
    assert_error(response, 404, "prefix_not_found")
    assert_error(client.get("/v1/prefixes/t/nothing"), 404, "prefix_not_found")
    assert_error(client.delete("/v1/prefixes/t/nothing"), 404, "prefix_not_found")


# -- sizes ----------------------------------------------------------------------------------------------------
def _chunks(total: int, head: bytes = b"", tail: bytes = b"") -> Iterator[bytes]:
    yield head
    for _ in range(total // 10_000):
        yield b"a" * 10_000
    yield tail


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = b"\0" * (MAX_BODY_BYTES + 1)
    assert_error(put_native(client, "t/big", big), 413, "body_too_large")
    # no Content-Length (chunked): cut off while reading
    headers = {"content-type": "application/octet-stream"}
    response = client.put("/v1/prefixes/t/big", content=_chunks(2 * MAX_BODY_BYTES), headers=headers)
    assert_error(response, 413, "body_too_large")
    multipart = (
        b'--bb\r\nContent-Disposition: form-data; name="adapter_model"; filename="a"\r\n\r\n',
        b"\r\n--bb--\r\n",
    )
    headers = {"content-type": "multipart/form-data; boundary=bb"}
    response = client.put(
        "/v1/prefixes/t/big", content=_chunks(2 * MAX_BODY_BYTES, *multipart), headers=headers
    )
    assert_error(response, 413, "body_too_large")


def test_oversized_json_body_is_413_even_chunked(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    response = client.post("/v1/generate", content=b"x" * (MAX_BODY_BYTES + 1), headers=headers)
    assert_error(response, 413, "body_too_large")
    body = _chunks(2 * MAX_BODY_BYTES, b'{"prompt": "', b'"}')
    assert_error(client.post("/v1/generate", content=body, headers=headers), 413, "body_too_large")
    body = _chunks(2 * MAX_BODY_BYTES, b'{"model": "t/ok", "prompt": "', b'"}')
    assert_error(client.post("/v1/completions", content=body, headers=headers), 413, "body_too_large")


# -- generation requests ----------------------------------------------------------------------------------------
BAD_SAMPLING = {
    "negative_temperature": {"temperature": -0.5},
    "top_p_zero": {"top_p": 0},
    "top_p_over_one": {"top_p": 1.01},
    "top_k_negative": {"top_k": -1},
    "max_new_tokens_zero": {"max_new_tokens": 0},
    "max_new_tokens_negative": {"max_new_tokens": -3},
    "max_new_tokens_text": {"max_new_tokens": "many"},
    "seed_negative": {"seed": -1},
    "empty_stop": {"stop": [""]},
    "stop_not_list": {"stop": 5},
    "prompt_missing": {"prompt": None},
    "prompt_not_string": {"prompt": ["a", "b"]},
    "unknown_field": {"temperture": 0.5},
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLING))
def test_invalid_sampling_is_422(client: httpx.Client, case: str) -> None:
    body = {"prefix": OK_ID, "prompt": "hello", **BAD_SAMPLING[case]}
    body = {k: v for k, v in body.items() if v is not None}
    assert_error(client.post("/v1/generate", json=body), 422)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_422(client: httpx.Client, literal: bytes) -> None:
    for field in (b"temperature", b"top_p"):
        body = b'{"prompt": "x", "' + field + b'": ' + literal + b"}"
        response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert_error(response, 422)


def test_prompt_that_does_not_fit_is_422(client: httpx.Client) -> None:
    # the tiny GPT-2 has 128 positions; t/ok has 4 virtual tokens
    prompt = "hello"
    num_prompt = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 1}).json()["usage"]
    fits = 128 - 4 - num_prompt["prompt_tokens"]
    ok = client.post(
        "/v1/generate", json={"prefix": OK_ID, "prompt": prompt, "max_new_tokens": fits, "ignore_eos": True}
    )
    assert ok.status_code == 200 and len(ok.json()["token_ids"]) == fits
    over = client.post("/v1/generate", json={"prefix": OK_ID, "prompt": prompt, "max_new_tokens": fits + 1})
    assert_error(over, 422, "prompt_too_long")
    long_prompt = client.post("/v1/generate", json={"prefix": OK_ID, "prompt": "hello world " * 200})
    assert_error(long_prompt, 422, "prompt_too_long")
    completions = client.post("/v1/completions", json={"model": OK_ID, "prompt": "hello world " * 200})
    assert_error(completions, 422, "prompt_too_long")


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"not json", "application/json"),
        (b'{"prompt": "x"', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"", "application/json"),
    ],
)
def test_non_json_body_is_422(client: httpx.Client, content: bytes, content_type: str) -> None:
    for path in ("/v1/generate", "/v1/completions"):
        response = client.post(path, content=content, headers={"content-type": content_type})
        assert_error(response, 422)
    response = client.post("/v1/generate", content=content, headers={"content-type": content_type})
    if content:  # an empty body is a missing body, not malformed JSON
        assert_error(response, 422, "invalid_json")
        assert "JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"prompt"', b"42", b"null"])
def test_json_that_is_not_an_object_is_422(client: httpx.Client, body: bytes) -> None:
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")
    assert "not a JSON object" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions"])
def test_json_sent_without_its_content_type_says_to_send_it(client: httpx.Client, path: str) -> None:
    # curl -d sends a form's Content-Type: the error names what to send, not pydantic's "valid dictionary"
    body = b'{"model": "x", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}'
    response = client.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(response, 422, "invalid_request")
    assert "Content-Type: application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_generate_with_wrong_content_type_is_4xx(client: httpx.Client, content_type: str) -> None:
    response = client.post("/v1/generate", content=b"prompt=hello", headers={"content-type": content_type})
    assert_error(response, 422)


@pytest.mark.parametrize(
    "body",
    [
        {"model": OK_ID, "prompt": "x", "max_tokens": 0},
        {"model": OK_ID, "prompt": []},
        {"model": OK_ID, "prompt": ["x"] * 33},
        {"model": OK_ID, "prompt": "x", "n": 17},
        {"model": OK_ID, "prompt": "x", "nonsense_field": 1},
        {"model": OK_ID, "prompt": "x", "suffix": "y"},
        {"model": OK_ID, "prompt": "x", "logit_bias": {"5": 10}},
        {"model": OK_ID, "prompt": "x", "best_of": 3},
        {"model": OK_ID, "prompt": "x", "num_beams": 4},
        {"model": OK_ID, "prompt": "x", "top_p": 0},
        {"model": OK_ID, "prompt": "x", "stop": [""]},
        {"prompt": "x"},
    ],
)
def test_invalid_completions_are_422(client: httpx.Client, body: dict) -> None:
    assert_error(client.post("/v1/completions", json=body), 422)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/prefixes", {"limit": 0}),
        ("/v1/prefixes", {"limit": 100_000}),
        ("/v1/prefixes", {"limit": "many"}),
        ("/v1/prefixes", {"cursor": "/w=="}),
        ("/v1/prefixes", {"tenant": "a b"}),
    ],
)
def test_bad_list_queries_are_4xx(client: httpx.Client, path: str, params: dict) -> None:
    response = client.get(path, params=params)
    assert_error(response, response.status_code)
    assert response.status_code in (400, 422)


def test_unknown_route_and_method_are_json(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/generate"), 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/v1/prefixes/t/abc%0A", "/v1/prefixes/t%0A/abc"])
def test_trailing_newline_in_id_is_refused(client: httpx.Client, path: str) -> None:
    response = client.put(path, content=_valid(), headers={"content-type": "application/octet-stream"})
    stored = response.status_code == 201
    if stored:  # keep the store clean for the other cases
        client.delete(path)
    assert_error(response, 400, "invalid_prefix_id")
