"""The HTTP front against hostile but legitimate clients (issue 29): strict types, huge prompts, clients that
vanish or send slowly, HEAD/OPTIONS, CORS, OpenAI's models.retrieve, special tokens in user text.

One real prefix-serve with auth on, a 2 s body timeout and one allowed browser origin; tenants alpha and beta.
Nothing asserts a duration tightly: the flood test only bounds another tenant's wait generously.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from edge_support import ADMIN_KEY, assert_error, native_prefix, put_native, wait_until
from serving import ServerProcess, running_server

from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.store import make_meta

ORIGIN = "https://app.example.com"
BODY_TIMEOUT = 2.0
CEILING = 60.0  # how long a condition may take on a slow, shared box (a ceiling, never a claim)


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("front")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    args = ["--body-timeout", str(BODY_TIMEOUT), "--cors-origins", ORIGIN]
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env, args=args) as served:
        yield served


def _client(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}, timeout=CEILING)


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with _client(server, ADMIN_KEY) as client:
        assert put_native(client, "alpha/p", native_prefix(seed=1)).status_code == 201
        assert put_native(client, "beta/p", native_prefix(seed=2)).status_code == 201
        yield client


def _tenant(server: ServerProcess, admin: httpx.Client, tenant: str) -> Iterator[httpx.Client]:
    response = admin.post(f"/v1/tenants/{tenant}/keys")
    assert response.status_code == 201, response.text
    with _client(server, response.json()["key"]) as client:
        yield client


@pytest.fixture(scope="module")
def alpha(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    yield from _tenant(server, admin, "alpha")


@pytest.fixture(scope="module")
def beta(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    yield from _tenant(server, admin, "beta")


def _requests_counted(client: httpx.Client, endpoint: str, status: int) -> float:
    text = client.get("/metrics").text
    pattern = rf'^prefixserve_requests_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- strict types (item 8) -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", True), ("ignore_eos", "yes"), ("stream", "true"), ("temperature", "1"), ("n", 1.0)],
)
def test_wrong_json_types_are_422_naming_the_field(alpha: httpx.Client, field: str, value: object) -> None:
    response = alpha.post("/v1/generate", json={"prefix": "alpha/p", "prompt": "hi", field: value})
    error = assert_error(response, 422, "invalid_request")
    assert field in error["error"]["message"]


def test_an_integer_is_a_fine_float(alpha: httpx.Client) -> None:
    body = {"prefix": "alpha/p", "prompt": "hi", "max_new_tokens": 2, "temperature": 0, "top_p": 1}
    assert alpha.post("/v1/generate", json=body).status_code == 200


def test_completions_are_strict_and_take_max_tokens_null(alpha: httpx.Client) -> None:
    body = {"model": "alpha/p", "prompt": "hi", "temperature": 0}
    assert_error(alpha.post("/v1/completions", json={**body, "max_tokens": True}), 422)
    assert_error(alpha.post("/v1/completions", json={**body, "echo": "yes"}), 422)
    response = alpha.post("/v1/completions", json={**body, "max_tokens": None})
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default, 16


# -- HEAD, OPTIONS, CORS, models.retrieve (item 9) -------------------------------------------------------------
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models", "/v1/prefixes/alpha/p"])
def test_head_answers_like_get_without_a_body(alpha: httpx.Client, path: str) -> None:
    get, head = alpha.get(path), alpha.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_options_and_405_list_every_method_of_the_path(alpha: httpx.Client) -> None:
    options = alpha.options("/v1/prefixes/alpha/p")
    assert options.status_code == 200
    allowed = {m.strip() for m in options.headers["allow"].split(",")}
    assert set(options.json()["allow"]) == allowed
    assert {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"} <= allowed and "POST" not in allowed
    refused = alpha.post("/v1/prefixes/alpha/p")
    assert_error(refused, 405)
    assert {m.strip() for m in refused.headers["allow"].split(",")} == allowed
    assert alpha.options("/no/such/path").status_code == 404


def test_cors_answers_the_configured_origin_only(server: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server.url}/v1/generate", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = httpx.options(
        f"{server.url}/v1/generate", headers={"Origin": "https://evil.example", **preflight}
    )
    assert_error(refused, 400, "cors_refused")
    assert "origin" in refused.json()["error"]["message"].lower()
    other = httpx.get(f"{server.url}/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(f"{server.url}/healthz", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_openai_models_retrieve_takes_prefix_ids(server: ServerProcess, admin, alpha: httpx.Client) -> None:
    openai = pytest.importorskip("openai")
    key = alpha.headers["authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key)
    model = client.models.retrieve("alpha/p")
    assert model.id == "alpha/p" and model.owned_by == "alpha"
    backbone = alpha.get("/v1/models").json()["data"][0]["id"]
    assert client.models.retrieve(backbone).id == backbone
    for hidden in ("beta/p", "beta/missing", "not-an-id"):  # another tenant's, missing, malformed: one answer
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(hidden)


# -- special tokens in user text (item 9) ----------------------------------------------------------------------
def test_user_text_cannot_spell_a_special_token(alpha: httpx.Client) -> None:
    prompt = "hello <|endoftext|> world"
    body = {"prefix": "alpha/p", "prompt": prompt, "max_new_tokens": 1}
    plain = alpha.post("/v1/generate", json=body).json()["usage"]["prompt_tokens"]
    asked = alpha.post("/v1/generate", json={**body, "special_tokens": True}).json()["usage"]["prompt_tokens"]
    assert asked < plain  # asked for: one token; by default the characters of "<|endoftext|>"


def test_a_template_special_token_stays_special(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from server.prompts import Prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompts = Prompts(tokenizer, tokenizer.bos_token_id, 128)
    template = " {source} <|endoftext|>"
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for source in ("name : Blue Spice | area : city centre", "a  b", ""):
        # what HF/PEFT generate are given: the whole filled prompt, tokenized as one
        expected = tokenizer(template.replace("{source}", source))["input_ids"]
        assert prompts._encode(tokenizer, template, source, False) == expected
    injected = prompts._encode(tokenizer, template, "a <|endoftext|> b", False)
    assert injected.count(eos) == 1 and injected[-1] == eos  # the template's, not the user's
    asked = prompts._encode(tokenizer, template, "a <|endoftext|> b", True)
    assert asked.count(eos) == 2
    prompts.close()


# -- huge prompts, templates (item 3) -------------------------------------------------------------------------
def test_template_with_source_twice_is_refused_at_upload(admin: httpx.Client) -> None:
    data = save_prefix(Prefix("gpt2", load_prefix(native_prefix()).targets, "{source} and {source}"))
    error = assert_error(put_native(admin, "alpha/twice", data), 422, "bad_prompt_template")
    assert "prompt_template" in error["error"]["message"]
    assert admin.get("/v1/prefixes/alpha/twice").status_code == 404


def test_stored_template_with_many_sources_is_bounded(
    server: ServerProcess, admin, alpha: httpx.Client
) -> None:
    # stored before uploads refused it: written into the store directly
    store = LocalStore(Path(server.log_path).parents[1] / "store")
    prefix = Prefix("gpt2", load_prefix(native_prefix()).targets, "{source}" * 20)
    data = save_prefix(prefix)
    store.put(make_meta("alpha/many", prefix, data, "native", False), data)
    response = alpha.post("/v1/generate", json={"prefix": "alpha/many", "prompt": "x" * 50_000})
    assert_error(response, 422, "prompt_too_long")
    assert alpha.post(
        "/v1/generate", json={"prefix": "alpha/many", "prompt": "x", "max_new_tokens": 1}
    ).is_success


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_huge_prompts_do_not_stall_another_tenant(server: ServerProcess, admin, alpha, beta) -> None:
    small = {"prefix": "beta/p", "prompt": "hello", "max_new_tokens": 2}
    assert beta.post("/v1/generate", json=small).status_code == 200
    rss_before = _rss_bytes(server.process.pid)
    huge = {"prefix": "alpha/p", "prompt": "word " * 200_000}  # 1,000,000 characters
    statuses: list[int] = []

    def flood() -> None:
        with _client(server, alpha.headers["authorization"].removeprefix("Bearer ")) as client:
            for _ in range(3):
                statuses.append(client.post("/v1/generate", json=huge).status_code)

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the flood is on the way
    started = time.monotonic()
    assert beta.post("/v1/generate", json=small).status_code == 200
    waited = time.monotonic() - started
    for thread in threads:
        thread.join(CEILING)
    assert statuses == [422] * 18
    # generous: before, the flood's tokenizing held another tenant's request for many seconds
    assert waited < 10.0, f"beta waited {waited:.1f} s behind alpha's huge prompts"
    assert _rss_bytes(server.process.pid) < rss_before + (300 << 20)


# -- clients that vanish or send slowly (items 6, 7) ----------------------------------------------------------
def _raw(server: ServerProcess, head: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CEILING)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _head(method: str, path: str, length: int, content_type: str) -> str:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
    )


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "content_type"),
    [
        ("PUT", "/v1/prefixes/alpha/gone", "/v1/prefixes/{tenant}/{name}", "application/octet-stream"),
        ("POST", "/v1/generate", "/v1/generate", "application/json"),
    ],
)
def test_a_client_gone_mid_body_is_no_5xx_and_one_line(
    server: ServerProcess, admin: httpx.Client, method: str, path: str, endpoint: str, content_type: str
) -> None:
    log_before = len(server.log())
    gone_before = _requests_counted(admin, endpoint, 499)
    _raw(server, _head(method, path, 100_000, content_type), b'{"prompt": "').close()
    assert wait_until(lambda: _requests_counted(admin, endpoint, 499) > gone_before, CEILING)
    assert _requests_counted(admin, endpoint, 500) == 0
    assert _requests_counted(admin, endpoint, 400) == 0
    new_log = server.log()[log_before:]
    assert "Traceback" not in new_log and "ERROR" not in new_log
    assert new_log.count("client disconnected") == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prefix": "alpha/p", "prompt": "hello", "max_new_tokens": 100, "ignore_eos": True}),
        ("/v1/completions", {"model": "alpha/p", "prompt": "hello", "max_tokens": 100, "ignore_eos": True}),
    ],
)
def test_a_client_gone_while_waiting_is_499_and_one_line(
    server: ServerProcess, admin: httpx.Client, path: str, body: dict
) -> None:
    """The whole body arrives, then the client leaves before its (unstreamed) answer: no response is ever
    written, so no access line either; the disconnect must still say so, once, with the request id."""
    log_before = len(server.log())
    gone_before = _requests_counted(admin, path, 499)
    data = json.dumps(body).encode()
    _raw(server, _head("POST", path, len(data), "application/json"), data).close()
    assert wait_until(lambda: _requests_counted(admin, path, 499) > gone_before, CEILING)
    assert _requests_counted(admin, path, 500) == 0
    new_log = server.log()[log_before:]
    assert "Traceback" not in new_log and "ERROR" not in new_log
    lines = [line for line in new_log.splitlines() if "client disconnected" in line]
    assert len(lines) == 1, new_log
    assert "request_id=" in lines[0]


def test_a_slow_body_is_cut_off_with_408(server: ServerProcess, admin: httpx.Client) -> None:
    sock = _raw(server, _head("PUT", "/v1/prefixes/alpha/slow", 1000, "application/octet-stream"), b"x")
    started = time.monotonic()
    answer = b""
    with sock:
        while time.monotonic() - started < CEILING:
            try:
                sock.sendall(b"x")  # a byte every 0.2 s: forever at this rate
            except OSError:
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                chunk = None
            finally:
                sock.setblocking(True)
            if chunk == b"":
                break
            answer += chunk or b""
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "body_timeout"
    assert b"connection: close" in answer.lower()
    assert admin.get("/v1/prefixes/alpha/slow").status_code == 404  # nothing stored


# -- another tenant's existing vs missing prefix (item 9) ------------------------------------------------------
def test_a_missing_foreign_prefix_costs_what_a_private_one_does(tmp_path: Path, monkeypatch) -> None:
    from server import generation

    store = LocalStore(tmp_path)
    data = native_prefix()
    store.put(make_meta("beta/secret", load_prefix(data), data, "native", False), data)
    reads: list[str] = []
    real_get_meta = store.get_meta
    monkeypatch.setattr(store, "get_meta", lambda pid: reads.append(pid) or real_get_meta(pid))
    real_stand_in = generation._stand_in_path
    monkeypatch.setattr(generation, "_stand_in_path", lambda: reads.append("stand-in") or real_stand_in())
    assert generation.public_meta(store, "beta/secret") is None
    assert reads == ["beta/secret"]  # found: one record read and parsed
    assert generation.public_meta(store, "beta/missing") is None
    assert reads[1:] == ["beta/missing", "stand-in"]  # missing: the stand-in record read and parsed instead


# -- request heads: bounded in size and time (the battery's "unfinished and slow request headers") ------------
def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    with sock:
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _json_error(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_a_head_that_never_ends_is_refused_at_64_kib(server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CEILING)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    sent = 0
    with contextlib.suppress(OSError):  # the server closes the connection while more is sent
        for _ in range(64):  # up to 32 MiB of one header, as the hostile run sent
            sock.sendall(b"a" * (512 << 10))
            sent += 512 << 10
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert _json_error(answer)["code"] == "headers_too_large"
    assert sent < 32 << 20  # cut off long before the 32 MiB


def test_a_slow_head_is_cut_off_with_408_and_an_idle_connection_closed(server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CEILING)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)  # forever at this rate: the deadline is BODY_TIMEOUT
            if time.monotonic() - started > CEILING:
                break
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert _json_error(answer)["code"] == "head_timeout"
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=CEILING)
    started = time.monotonic()
    assert _answer(idle) == b""  # nothing sent, nothing answered: closed
    assert time.monotonic() - started < CEILING


def test_bounded_heads_leave_big_bodies_and_keep_alive_alone(
    server: ServerProcess, alpha: httpx.Client
) -> None:
    """The head's count stops where the head ends: a body far over 64 KiB in the same packets is no head."""
    body = json.dumps({"prefix": "alpha/p", "prompt": "x " * 200_000, "max_new_tokens": 1}).encode()
    assert len(body) > 256 << 10
    sock = _raw(server, _head("POST", "/v1/generate", len(body), "application/json"), body)
    answer = b""
    with sock:
        while not answer.rstrip().endswith(b"}") and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 422") and _json_error(answer)["code"] == "prompt_too_long", answer[
        :300
    ]
    big_header = {"x-pad": "a" * (48 << 10)}  # under the bound: served
    for _ in range(3):  # keep-alive: one connection, three requests
        assert alpha.get("/healthz", headers=big_header).status_code == 200
