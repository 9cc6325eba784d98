"""The client's parsing and error mapping against canned answers (httpx.MockTransport): no server needed."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prefixserve_client import (
    AsyncPrefixServeClient,
    AuthenticationError,
    ConnectionError,
    GenerateChoice,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeClient,
    PrefixServeError,
    QueueFullError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    TenantInfo,
    TokenLogprob,
    TopLogprob,
    ValidationError,
)
from prefixserve_client.cli import main as prefixctl

META = {
    "id": "acme/e2e",
    "tenant": "acme",
    "name": "e2e",
    "num_virtual_tokens": 4,
    "bytes": 1234,
    "dtype": "float32",
    "sha256": "ab" * 32,
    "source": "native",
    "targets": ["decoder"],
    "public": False,
    "created_at": 1.0,
    "updated_at": 2.0,
}
RESULT = {
    "id": "gen-1",
    "prefix": "acme/e2e",
    "text": "hello",
    "token_ids": [5, 6],
    "finish_reason": "length",
    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
}
SSE = (
    'data: {"token_id": 5, "text": "hel"}\n\n'
    ": keep-alive\n\n"
    'data: {"token_id": 6, "text": "lo"}\n\n'
    'data: {"finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    "data: [DONE]\n\n"
)


def error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


def client_for(handler, **kwargs) -> PrefixServeClient:
    return PrefixServeClient("http://test", transport=httpx.MockTransport(handler), **kwargs)


def test_generate_sends_body_and_routing_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RESULT)

    with client_for(handler, api_key="sk-test") as client:
        result = client.generate("acme/e2e", "hi", max_new_tokens=2, temperature=None, stop=["."])
    request = seen[0]
    assert request.url.path == "/v1/generate"
    assert request.headers["X-Prefix-Id"] == "acme/e2e"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert json.loads(request.content) == {
        "prefix": "acme/e2e",
        "prompt": "hi",
        "max_new_tokens": 2,
        "stop": ["."],
    }
    assert result.text == "hello" and result.token_ids == [5, 6] and result.finish_reason == "length"
    assert result.usage.prompt_tokens == 3 and result.usage.total_tokens == 5


def test_bare_backbone_sends_no_prefix_header() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "X-Prefix-Id" not in request.headers
        assert json.loads(request.content)["prefix"] is None
        return httpx.Response(200, json={**RESULT, "prefix": None})

    with client_for(handler) as client:
        assert client.generate(None, "hi").prefix is None


def test_env_sets_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXSERVE_URL", "http://example.invalid:9/")
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "sk-env")
    client = PrefixServeClient()
    assert client.base_url == "http://example.invalid:9"
    assert client.api_key == "sk-env" and "sk-env" not in repr(client)
    client.close()
    monkeypatch.delenv("PREFIXSERVE_URL")
    assert PrefixServeClient(api_key="x").base_url == "http://127.0.0.1:8000"


def test_stream_parses_token_events_and_final_event() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=SSE, headers={"Content-Type": "text/event-stream"})

    with client_for(handler) as client:
        events = list(client.stream_generate("acme/e2e", "hi"))
    assert [(e.token_id, e.text) for e in events[:2]] == [(5, "hel"), (6, "lo")]
    final = events[-1]
    assert final.is_final and final.finish_reason == "length" and final.usage is not None
    assert final.usage.completion_tokens == 2 and len(events) == 3


def test_stream_cut_before_the_end_is_a_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text='data: {"token_id": 5, "text": "hel"}\n\n')

    with client_for(handler) as client, pytest.raises(ConnectionError, match="ended before"):
        list(client.stream_generate("acme/e2e", "hi"))


def test_stream_error_event_raises_typed_error() -> None:
    body = 'data: {"token_id": 5, "text": "a"}\n\ndata: {"error": {"code": "engine_failed", "message": "boom"}}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body)

    with client_for(handler) as client, pytest.raises(ServerError) as info:
        list(client.stream_generate("acme/e2e", "hi"))
    assert info.value.code == "engine_failed"


def test_stream_http_error_before_events() -> None:
    client = client_for(lambda r: error(404, "prefix_not_found", "no prefix acme/x"))
    with client, pytest.raises(NotFoundError) as info:
        list(client.stream_generate("acme/x", "hi"))
    assert info.value.status == 404 and info.value.code == "prefix_not_found"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ValidationError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (422, ValidationError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServerError),
        (409, PrefixServeError),
    ],
)
def test_status_maps_to_error_class(status: int, cls: type[PrefixServeError]) -> None:
    client = client_for(lambda r: error(status, "some_code", "what to fix", **{"Retry-After": "7"}))
    with client, pytest.raises(cls) as info:
        client.get_prefix("acme/e2e")
    err = info.value
    assert type(err) is cls
    assert (err.status, err.code, err.message) == (status, "some_code", "what to fix")
    assert "what to fix" in str(err)
    if cls is RateLimitError:
        assert isinstance(err, RateLimitError) and err.retry_after == 7.0


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("quota_exceeded", QuotaExceededError),
        ("tenant_queue_full", QueueFullError),
        ("queue_full", QueueFullError),
        ("something_new", RateLimitError),
    ],
)
def test_429_codes_map_to_rate_limit_subclasses(code: str, cls: type[RateLimitError]) -> None:
    client = client_for(lambda r: error(429, code, "wait", **{"Retry-After": "12"}))
    with client, pytest.raises(RateLimitError) as info:
        client.generate(None, "hi")
    assert type(info.value) is cls and info.value.code == code and info.value.retry_after == 12.0


def test_non_json_error_body_still_maps() -> None:
    client = client_for(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with client, pytest.raises(ServerError) as info:
        client.health()
    assert info.value.code == "http_502" and "Bad Gateway" in info.value.message


def test_transport_failure_is_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with client_for(handler) as client, pytest.raises(ConnectionError) as info:
        client.health()
    assert info.value.status is None and isinstance(info.value, PrefixServeError)


def test_bad_prefix_id_is_refused_before_sending() -> None:
    with client_for(lambda r: pytest.fail("sent")) as client:
        for bad in ("acme", "a/b/c", "acme/..", "acme/-x", "acme/" + "x" * 65):
            with pytest.raises(ValidationError):
                client.get_prefix(bad)


def test_list_prefixes_follows_cursors() -> None:
    pages = {
        None: {"prefixes": [META], "next_cursor": "c1"},
        "c1": {"prefixes": [{**META, "id": "acme/f", "name": "f"}], "next_cursor": None},
    }
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        return httpx.Response(200, json=pages[params.get("cursor")])

    with client_for(handler) as client:
        ids = [p.id for p in client.list_prefixes(tenant="acme", limit=1)]
        page = client.list_prefixes_page(tenant="acme", limit=1)
    assert ids == ["acme/e2e", "acme/f"]
    assert seen[0] == {"tenant": "acme", "limit": "1"} and seen[1]["cursor"] == "c1"
    assert page.next_cursor == "c1" and page.prefixes[0].num_virtual_tokens == 4


def test_upload_native_file_and_peft_dir(tmp_path: Path) -> None:
    native = tmp_path / "p.safetensors"
    native.write_bytes(b"native-bytes")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"peft-weights")
    (adapter / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201 if len(seen) == 1 else 200, json=META)

    with client_for(handler) as client:
        first = client.upload("acme/e2e", native, public=True)
        second = client.upload("acme/e2e", adapter)
    assert first.created is True and second.created is False
    put_native, put_peft = seen
    assert put_native.method == "PUT" and put_native.url.path == "/v1/prefixes/acme/e2e"
    assert put_native.url.params["public"] == "true"
    assert (
        put_native.headers["Content-Type"] == "application/octet-stream"
        and put_native.content == b"native-bytes"
    )
    assert "public" not in put_peft.url.params
    assert put_peft.headers["Content-Type"].startswith("multipart/form-data")
    body = put_peft.read()
    assert b'name="adapter_model"' in body and b"peft-weights" in body
    assert b'name="adapter_config"' in body and b"PREFIX_TUNING" in body


def test_upload_missing_path(tmp_path: Path) -> None:
    with client_for(lambda r: pytest.fail("sent")) as client:
        with pytest.raises(FileNotFoundError):
            client.upload("acme/e2e", tmp_path / "nope.safetensors")
        with pytest.raises(FileNotFoundError, match="adapter_config.json"):
            client.upload("acme/e2e", tmp_path)


def test_keys_and_delete() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            assert request.url.path == "/v1/tenants/acme/keys"
            return httpx.Response(201, json={"key_id": "k1", "key": "psk_secret"})
        assert request.method == "DELETE"
        return httpx.Response(204)

    with client_for(handler) as client:
        key_id, key = client.create_key("acme")
        client.revoke_key("acme", key_id)
        client.delete_prefix("acme/e2e")
    assert (key_id, key) == ("k1", "psk_secret")


def test_tenant_settings_body_and_parsing() -> None:
    sent: list[httpx.Request] = []
    answer = {
        "tenant": "acme",
        "weight": 2.0,
        "max_concurrent": None,
        "requests_per_minute": 60,
        "tokens_per_minute": None,
        "usage": {"running": 1, "queued": 2, "requests_last_minute": 3, "tokens_last_minute": 40},
        "later_field": "kept in raw",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        assert request.url.path == "/v1/tenants/acme"
        return httpx.Response(200, json=answer)

    with client_for(handler) as client:
        info = client.set_tenant("acme", weight=2, max_concurrent=None)
        assert client.get_tenant("acme") == info
        with pytest.raises(ValidationError):
            client.set_tenant("acme", burst=3)  # not a setting: refused before sending
        with pytest.raises(ValidationError):
            client.get_tenant("acme/x")
    assert [r.method for r in sent] == ["PUT", "GET"]
    assert json.loads(sent[0].content) == {"weight": 2, "max_concurrent": None}  # None is sent: a reset
    assert (info.weight, info.max_concurrent, info.requests_per_minute, info.tokens_per_minute) == (
        2.0,
        None,
        60,
        None,
    )
    assert (info.usage.running, info.usage.queued) == (1, 2)
    assert (info.usage.requests_last_minute, info.usage.tokens_last_minute) == (3, 40)
    assert info.to_dict()["later_field"] == "kept in raw"
    assert TenantInfo.from_dict({"tenant": "x"}).weight == 1.0  # defaults for fields left out
    assert TenantInfo("x").to_dict()["usage"] == {
        "running": 0,
        "queued": 0,
        "requests_last_minute": 0,
        "tokens_last_minute": 0,
    }


async def test_async_client_streams_and_pages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            return httpx.Response(200, text=SSE)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        cursor = request.url.params.get("cursor")
        return httpx.Response(200, json={"prefixes": [META], "next_cursor": None if cursor else "c"})

    async with AsyncPrefixServeClient("http://test", transport=httpx.MockTransport(handler)) as client:
        texts = [e.text async for e in client.stream_generate("acme/e2e", "hi")]
        prefixes = [p async for p in client.list_prefixes()]
        models = await client.models()
    assert texts == ["hel", "lo", ""] and len(prefixes) == 2 and models[0].id == "tiny"


async def test_async_errors_map() -> None:
    transport = httpx.MockTransport(lambda r: error(401, "unauthorized", "send a key"))
    async with AsyncPrefixServeClient("http://test", transport=transport) as client:
        with pytest.raises(AuthenticationError):
            await client.generate("acme/e2e", "hi")


def test_cli_exit_codes_and_messages(capsys: pytest.CaptureFixture[str]) -> None:
    # nothing listens on port 9 of 127.0.0.1: unreachable -> 3; a bad id -> 2 without sending
    assert prefixctl(["--url", "http://127.0.0.1:9", "list"]) == 3
    assert "connection_error" in capsys.readouterr().err
    assert prefixctl(["show", "not-an-id", "--url", "http://127.0.0.1:9"]) == 2
    assert "<tenant>/<name>" in capsys.readouterr().err
    assert prefixctl(["--json", "--url", "http://127.0.0.1:9", "upload", "a/b", "/nonexistent"]) == 2
    assert json.loads(capsys.readouterr().err)["error"]["code"] == "local_file"


def _entry(token_id: int, logprob: float, top: list[tuple[int, str, float]]) -> dict:
    return {
        "token_id": token_id,
        "logprob": logprob,
        "top": [{"token_id": t, "text": text, "logprob": lp} for t, text, lp in top],
    }


LOGPROBS = [_entry(5, -0.5, [(5, "hel", -0.5), (9, "x", -1.5)]), _entry(6, -2.0, [(7, "y", -0.25)])]
CHOICES = [
    {"index": 0, "text": "hello", "token_ids": [5, 6], "finish_reason": "length", "logprobs": LOGPROBS},
    {"index": 1, "text": "hi", "token_ids": [8], "finish_reason": "stop", "logprobs": [_entry(8, -0.1, [])]},
]
RESULT_N2 = {
    **RESULT,
    "logprobs": LOGPROBS,
    "choices": CHOICES,
    "usage": {"prompt_tokens": 3, "completion_tokens": 3},
}


def test_generate_sends_decoding_options_and_parses_logprobs_and_choices() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=RESULT_N2)

    options = {
        "n": 2,
        "num_beams": 4,
        "length_penalty": 0.5,
        "early_stopping": True,
        "logprobs": 2,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    with client_for(handler) as client:
        result = client.generate("acme/e2e", "hi", **options, seed=None)
    assert seen[0] == {"prefix": "acme/e2e", "prompt": "hi", **options}  # as given, None left out
    assert result.logprobs is not None and [e.token_id for e in result.logprobs] == result.token_ids
    first = result.logprobs[0]
    assert (first.logprob, first.text, [t.token_id for t in first.top]) == (-0.5, "hel", [5, 9])
    assert first.top[1] == TopLogprob(9, "x", -1.5)
    assert result.logprobs[1].text is None  # not among its alternatives: the server sent no text for it
    assert result.choices is not None and result.completions == result.choices
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in result.choices] == [
        (0, "hello", [5, 6], "length"),
        (1, "hi", [8], "stop"),
    ]
    assert result.choices[1].logprobs == [TokenLogprob(8, -0.1, [])]


def test_plain_result_has_no_logprobs_or_choices() -> None:
    with client_for(lambda r: httpx.Response(200, json=RESULT)) as client:
        result = client.generate("acme/e2e", "hi")
    assert result.logprobs is None and result.choices is None
    assert result.completions == [GenerateChoice(0, "hello", [5, 6], "length", None)]


def test_stream_option_is_refused_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    with client_for(handler) as client, pytest.raises(ValidationError, match="stream_generate"):
        client.generate("acme/e2e", "hi", stream=True)


def _sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


N2_EVENTS = [
    {"index": 0, "token_id": 5, "text": "hel", "logprobs": LOGPROBS[0]},
    {
        "index": 0,
        "id": "g",
        "text": "",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    },
    {"index": 1, "token_id": 8, "text": "hi", "logprobs": _entry(8, -0.1, [])},
    {
        "index": 1,
        "id": "g",
        "text": "",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    },
]


def test_stream_events_carry_index_and_logprobs() -> None:
    with client_for(lambda r: httpx.Response(200, text=_sse(*N2_EVENTS, "[DONE]"))) as client:
        events = list(client.stream_generate("acme/e2e", "hi", n=2, logprobs=2))
    assert [(e.index, e.token_id, e.is_final) for e in events] == [
        (0, 5, False),
        (0, None, True),
        (1, 8, False),
        (1, None, True),
    ]
    assert events[0].logprobs == TokenLogprob.from_dict(LOGPROBS[0]) and events[1].logprobs is None
    assert events[2].logprobs is not None and events[2].logprobs.logprob == -0.1
    # n = 1: no index in the events, 0 for all
    with client_for(lambda r: httpx.Response(200, text=SSE)) as client:
        assert {e.index for e in client.stream_generate("acme/e2e", "hi")} == {0}


def test_stream_of_n_cut_after_one_completion_is_a_connection_error() -> None:
    """With n = 2 a stream that ends after the first completion's last event (no [DONE]) is incomplete."""
    cut = client_for(lambda r: httpx.Response(200, text=_sse(*N2_EVENTS[:2])))
    with cut, pytest.raises(ConnectionError, match="ended before"):
        list(cut.stream_generate("acme/e2e", "hi", n=2))
    with client_for(lambda r: httpx.Response(200, text=_sse(*N2_EVENTS))) as client:
        assert len(list(client.stream_generate("acme/e2e", "hi", n=2))) == 4  # both finished: whole


def test_cli_generate_shows_choices_and_logprob_table(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=RESULT_N2)

    transport = httpx.MockTransport(handler)
    real_client = PrefixServeClient

    def with_transport(*args, **kwargs):
        return real_client(*args, transport=transport, **kwargs)

    flags = ["--n", "2", "--logprobs", "2", "--num-beams", "1", "--length-penalty", "0.5", "--early-stopping"]
    flags += ["--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "-0.5"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("prefixserve_client.cli.PrefixServeClient", with_transport)
        assert prefixctl(["--url", "http://test", "generate", "acme/e2e", "hi", *flags]) == 0
    assert seen[0] == {
        "prefix": "acme/e2e",
        "prompt": "hi",
        "n": 2,
        "logprobs": 2,
        "num_beams": 1,
        "length_penalty": 0.5,
        "early_stopping": True,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- completion 0 (length) ---" and lines[1] == "hello"
    assert lines[3].split() == ["#", "TOKEN", "ID", "LOGPROB", "PROB", "TOP", "ALTERNATIVES"]
    assert lines[4].split() == ["0", '"hel"', "5", "-0.5000", "60.65%", '"hel"', "-0.5000", '"x"', "-1.5000"]
    assert lines[5].split() == ["1", "?", "6", "-2.0000", "13.53%", '"y"', "-0.2500"]
    assert lines[7:9] == ["--- completion 1 (stop) ---", "hi"]
    assert lines[11].split() == ["0", "?", "8", "-0.1000", "90.48%"]
