"""PrefixServeClient and AsyncPrefixServeClient against a real prefix-serve process (tiny random GPT-2)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prefixserve_client import (
    AsyncPrefixServeClient,
    AuthenticationError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeClient,
    PrefixServeError,
    QuotaExceededError,
    RateLimitError,
    TenantInfo,
    TenantUsage,
    ValidationError,
)


@pytest.fixture
def admin(server_url: str, admin_key: str) -> Iterator[PrefixServeClient]:
    with PrefixServeClient(server_url, api_key=admin_key, timeout=30) as client:
        yield client


def test_health_ready_models(admin: PrefixServeClient) -> None:
    assert admin.health()["status"] == "ok"
    assert admin.ready()["status"] == "ready"
    assert admin.models(), "GET /v1/models lists at least the backbone"
    assert "prefixserve_requests_total" in admin.metrics()


def test_upload_native_then_replace(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    first = admin.upload("native/p1", native_prefix_file)
    assert first.created is True
    assert (first.id, first.tenant, first.name) == ("native/p1", "native", "p1")
    assert (first.num_virtual_tokens, first.source, first.targets) == (5, "native", ["decoder"])
    assert first.dtype == "float32" and not first.public
    assert first.sha256 == hashlib.sha256(native_prefix_file.read_bytes()).hexdigest()
    again = admin.upload("native/p1", native_prefix_file)
    assert again.created is False and again.created_at == first.created_at
    assert again.sha256 == first.sha256, (
        "the same bytes uploaded twice must keep their sha256 (stored bytes stable)"
    )
    shown = admin.get_prefix("native/p1")
    assert (
        shown.sha256 == first.sha256 and shown.bytes == first.bytes and shown.updated_at >= first.updated_at
    )


def test_upload_peft_directory(admin: PrefixServeClient, peft_adapter_dir: Path) -> None:
    info = admin.upload("peft/adapter", peft_adapter_dir, public=True)
    assert info.created and info.source == "peft" and info.num_virtual_tokens == 4 and info.public
    # the adapter_model.safetensors path counts as its directory
    assert admin.upload("peft/adapter2", peft_adapter_dir / "adapter_model.safetensors").source == "peft"


def test_generate_greedy_is_deterministic_and_streams_the_same(
    admin: PrefixServeClient, native_prefix_file: Path
) -> None:
    admin.upload("gen/p", native_prefix_file)
    result = admin.generate("gen/p", "the quick brown fox", max_new_tokens=8, ignore_eos=True)
    assert result.prefix == "gen/p" and result.finish_reason == "length"
    assert (
        len(result.token_ids) == 8 and result.usage.completion_tokens == 8 and result.usage.prompt_tokens > 0
    )
    assert admin.generate("gen/p", "the quick brown fox", max_new_tokens=8, ignore_eos=True).token_ids == (
        result.token_ids
    )
    events = list(admin.stream_generate("gen/p", "the quick brown fox", max_new_tokens=8, ignore_eos=True))
    tokens = [e for e in events if e.token_id is not None]
    assert [e.token_id for e in tokens] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    final = events[-1]
    assert final.is_final and final.finish_reason == "length" and final.usage == result.usage
    # the prefix matters: the bare backbone answers differently (random prefix values, tiny model)
    bare = admin.generate(None, "the quick brown fox", max_new_tokens=8, ignore_eos=True)
    assert bare.prefix is None and bare.token_ids != result.token_ids


def test_closing_a_stream_early_frees_the_server(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    admin.upload("gen/early", native_prefix_file)
    stream = admin.stream_generate("gen/early", "hello", max_new_tokens=100, ignore_eos=True)
    first = next(iter(stream))
    assert first.token_id is not None
    stream.close()  # type: ignore[attr-defined]
    # the server has 64 slots, so one more request being served proves nothing: watch the engine instead
    assert wait_until(lambda: running_requests(admin) == 0), "the closed stream still holds its slot"
    generated = metric(admin, "prefixserve_generated_tokens_total")
    assert (
        admin.generate("gen/early", "hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    )
    assert metric(admin, "prefixserve_generated_tokens_total") == generated + 2  # nothing else generating


def metric(client: PrefixServeClient, name: str) -> float:
    for line in client.metrics().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def running_requests(client: PrefixServeClient) -> float:
    return metric(client, "prefixserve_running_requests") + metric(client, "prefixserve_queue_depth")


def wait_until(condition: Callable[[], bool], ceiling: float = 30.0) -> bool:
    """Poll `condition` until it holds; False after `ceiling` seconds (generous: a slow box is no failure)."""
    deadline = time.monotonic() + ceiling
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_list_pages_through_every_prefix(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    names = [f"n{i}" for i in range(5)]
    for name in names:
        admin.upload(f"paging/{name}", native_prefix_file)
    page = admin.list_prefixes_page(tenant="paging", limit=2)
    assert len(page.prefixes) == 2 and page.next_cursor
    listed = [p.id for p in admin.list_prefixes(tenant="paging", limit=2)]
    assert listed == [f"paging/{n}" for n in names]
    everything = [p.id for p in admin.list_prefixes(limit=3)]  # the admin sees every tenant
    assert set(listed) <= set(everything) and everything == sorted(everything)


def test_delete_then_not_found(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    admin.upload("gone/p", native_prefix_file)
    admin.delete_prefix("gone/p")
    with pytest.raises(NotFoundError) as info:
        admin.get_prefix("gone/p")
    assert info.value.status == 404 and info.value.code == "prefix_not_found" and info.value.message
    with pytest.raises(NotFoundError):
        admin.delete_prefix("gone/p")
    with pytest.raises(NotFoundError):
        admin.generate("gone/p", "hello", max_new_tokens=2)
    with pytest.raises(NotFoundError):
        list(admin.stream_generate("gone/p", "hello", max_new_tokens=2))


def test_invalid_requests_are_validation_errors(admin: PrefixServeClient, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValidationError) as info:
        admin.upload("bad/junk", junk)
    assert info.value.status in (400, 422) and info.value.code == "invalid_safetensors"
    with pytest.raises(ValidationError) as info:
        admin.generate(None, "hello", top_p=2.0)
    assert info.value.status == 422 and "top_p" in info.value.message


def test_body_over_the_limit_is_payload_too_large(
    admin: PrefixServeClient, max_body_bytes: int, tmp_path: Path
) -> None:
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (max_body_bytes + 1))
    with pytest.raises(PayloadTooLargeError) as info:
        admin.upload("big/p", big)
    assert info.value.status == 413 and info.value.code == "body_too_large"


def test_short_generations_return_their_tokens(admin: PrefixServeClient) -> None:
    """A request that finishes in its first engine step still answers (regression: outputs were lost)."""
    for _ in range(10):
        result = admin.generate(None, "hello", max_new_tokens=1, ignore_eos=True)
        assert len(result.token_ids) == 1 and result.finish_reason == "length"
        events = list(admin.stream_generate(None, "hello", max_new_tokens=1, ignore_eos=True))
        assert events and events[-1].finish_reason == "length"
        assert [e.token_id for e in events if e.token_id is not None] == result.token_ids


def test_every_new_key_works(server_url: str, admin: PrefixServeClient) -> None:
    """Each created key authenticates, whatever characters its random part holds."""
    for _ in range(8):
        key_id, key = admin.create_key("keys")
        with PrefixServeClient(server_url, api_key=key) as tenant:
            assert tenant.list_prefixes_page().prefixes == [], f"new key {key_id} was refused"
        admin.revoke_key("keys", key_id)


def test_keys_scope_a_tenant(server_url: str, admin: PrefixServeClient, native_prefix_file: Path) -> None:
    admin.upload("other/secret", native_prefix_file)
    key_id, key = admin.create_key("acme")
    assert key_id and key and key_id in key
    with PrefixServeClient(server_url, api_key=key) as tenant:
        assert tenant.upload("acme/mine", native_prefix_file).created
        assert [p.id for p in tenant.list_prefixes()] == ["acme/mine"]
        assert tenant.generate("acme/mine", "hello", max_new_tokens=2).id
        for call in (
            lambda: tenant.get_prefix("other/secret"),
            lambda: tenant.generate("other/secret", "hello", max_new_tokens=2),
            lambda: tenant.delete_prefix("other/secret"),
        ):
            with pytest.raises((NotFoundError, PermissionDeniedError)):
                call()
        with pytest.raises(PermissionDeniedError):
            tenant.create_key("acme")
        with pytest.raises(PermissionDeniedError):
            tenant.upload("acme/pub", native_prefix_file, public=True)
        admin.revoke_key("acme", key_id)
        with pytest.raises(AuthenticationError) as info:
            tenant.list_prefixes_page()
        assert info.value.status == 401
    with pytest.raises(NotFoundError):
        admin.revoke_key("acme", key_id)


def test_missing_or_wrong_key_is_authentication_error(server_url: str) -> None:
    for key in ("", "psk_nope_nope"):
        with PrefixServeClient(server_url, api_key=key) as client, pytest.raises(AuthenticationError) as info:
            client.list_prefixes_page()
        assert info.value.code == "unauthorized"


def test_x_prefix_id_header_reaches_the_server(
    server_url: str, admin_key: str, native_prefix_file: Path
) -> None:
    seen: list[httpx.Request] = []
    transport = httpx.HTTPTransport()

    class Spy(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return transport.handle_request(request)

    with PrefixServeClient(server_url, api_key=admin_key, transport=Spy()) as client:
        client.upload("hdr/p", native_prefix_file)
        client.generate("hdr/p", "hello", max_new_tokens=1)
    assert seen[-1].headers["X-Prefix-Id"] == "hdr/p"


async def test_async_client(server_url: str, admin_key: str, native_prefix_file: Path) -> None:
    async with AsyncPrefixServeClient(server_url, api_key=admin_key, timeout=30) as client:
        assert (await client.upload("async/p", native_prefix_file)).created
        result = await client.generate("async/p", "hello", max_new_tokens=4, ignore_eos=True)
        events = [
            e async for e in client.stream_generate("async/p", "hello", max_new_tokens=4, ignore_eos=True)
        ]
        assert [e.token_id for e in events if e.token_id is not None] == result.token_ids
        assert [p.id async for p in client.list_prefixes(tenant="async", limit=1)] == ["async/p"]
        assert (await client.get_prefix("async/p")).num_virtual_tokens == 5
        key_id, _ = await client.create_key("async")
        await client.revoke_key("async", key_id)
        await client.delete_prefix("async/p")
        with pytest.raises(PrefixServeError) as info:
            await client.get_prefix("async/p")
        assert info.value.status == 404


def test_tenant_settings_set_show_and_reset(admin: PrefixServeClient) -> None:
    fresh = admin.get_tenant("settings")
    assert fresh == TenantInfo("settings", 1.0, None, None, None, TenantUsage(0, 0, 0, 0))
    info = admin.set_tenant("settings", weight=2.5, max_concurrent=3, tokens_per_minute=5000)
    assert (
        info.tenant,
        info.weight,
        info.max_concurrent,
        info.requests_per_minute,
        info.tokens_per_minute,
    ) == (
        "settings",
        2.5,
        3,
        None,
        5000,
    )
    assert info.raw["usage"] == {
        "running": 0,
        "queued": 0,
        "requests_last_minute": 0,
        "tokens_last_minute": 0,
    }
    assert admin.get_tenant("settings") == info
    # settings not sent keep their value; None sends null, which resets one to its default
    info = admin.set_tenant("settings", requests_per_minute=100, max_concurrent=None, weight=None)
    assert (info.weight, info.max_concurrent, info.requests_per_minute, info.tokens_per_minute) == (
        1.0,
        None,
        100,
        5000,
    )
    assert admin.set_tenant("settings") == info  # nothing sent: nothing changes
    for bad in ({"weight": 0}, {"weight": 1001}, {"max_concurrent": 0}, {"tokens_per_minute": 1.5}):
        with pytest.raises(ValidationError) as error:
            admin.set_tenant("settings", **bad)
        assert error.value.status == 422, bad
    with pytest.raises(ValidationError) as error:
        admin.set_tenant("settings", colour="blue")  # refused before sending
    assert (
        error.value.status is None and error.value.code == "invalid_settings" and "colour" in str(error.value)
    )
    with pytest.raises(ValidationError) as error:
        admin.get_tenant("../admin")
    assert error.value.status is None and error.value.code == "invalid_id"
    assert admin.get_tenant("settings") == info


def test_tenant_key_reads_its_own_settings_only(server_url: str, admin: PrefixServeClient) -> None:
    admin.set_tenant("owner", requests_per_minute=50)
    key_id, key = admin.create_key("owner")
    try:
        with PrefixServeClient(server_url, api_key=key) as tenant:
            assert tenant.get_tenant("owner").requests_per_minute == 50
            with pytest.raises(NotFoundError) as error:
                tenant.get_tenant("settings")
            assert error.value.code == "tenant_not_found"
            with pytest.raises(PermissionDeniedError):
                tenant.set_tenant("owner", requests_per_minute=None)
        assert admin.get_tenant("owner").requests_per_minute == 50
    finally:
        admin.revoke_key("owner", key_id)


def test_requests_per_minute_quota_is_quota_exceeded_with_retry_after(
    server_url: str, admin: PrefixServeClient
) -> None:
    admin.set_tenant("metered", requests_per_minute=2)
    key_id, key = admin.create_key("metered")
    try:
        with PrefixServeClient(server_url, api_key=key) as tenant:
            served = 0
            with pytest.raises(QuotaExceededError) as error:
                for _ in range(8):  # usage is counted just after admission, so allow a little slack
                    tenant.generate(None, "hello", max_new_tokens=2, ignore_eos=True)
                    served += 1
            assert 2 <= served <= 4
            refused = error.value
            assert isinstance(refused, RateLimitError) and refused.status == 429
            assert refused.code == "quota_exceeded" and "requests_per_minute" in refused.message
            assert refused.retry_after is not None and 1 <= refused.retry_after <= 60
            with pytest.raises(QuotaExceededError):  # the stream is refused the same way, before its 200
                list(tenant.stream_generate(None, "hello", max_new_tokens=2))
            usage = tenant.get_tenant("metered").usage
            assert usage.requests_last_minute >= 2 and usage.running == 0 and usage.queued == 0
            deadline = time.monotonic() + 10  # generated tokens are counted after each request ends
            while tenant.get_tenant("metered").usage.tokens_last_minute == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tenant.get_tenant("metered").usage.tokens_last_minute > 0

            admin.set_tenant("metered", requests_per_minute=None)
            assert (
                tenant.generate(None, "hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            )
    finally:
        admin.revoke_key("metered", key_id)


async def test_async_tenant_settings(server_url: str, admin_key: str) -> None:
    async with AsyncPrefixServeClient(server_url, api_key=admin_key, timeout=30) as client:
        info = await client.set_tenant("asynctenant", weight=3, tokens_per_minute=900)
        assert (info.weight, info.tokens_per_minute, info.max_concurrent) == (3.0, 900, None)
        assert await client.get_tenant("asynctenant") == info
        assert (await client.set_tenant("asynctenant", tokens_per_minute=None)).tokens_per_minute is None
        with pytest.raises(ValidationError):
            await client.set_tenant("asynctenant", weight=-1)


PROMPT = "the quick brown fox"


def test_logprobs_are_there_and_consistent_with_the_tokens(
    admin: PrefixServeClient, native_prefix_file: Path
) -> None:
    admin.upload("lp/p", native_prefix_file)
    result = admin.generate("lp/p", PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=3)
    assert result.logprobs is not None and result.choices is None
    assert len(result.logprobs) == len(result.token_ids) == 6
    for entry, token_id in zip(result.logprobs, result.token_ids, strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0 and len(entry.top) == 3
        assert entry.top[0].logprob >= entry.logprob - 1e-6, "greedy picks the most likely token"
        assert entry.text is not None, "greedy: the chosen token is among the alternatives, so it has text"
        top = [t.logprob for t in entry.top]
        assert top == sorted(top, reverse=True) and len({t.token_id for t in entry.top}) == 3
    plain = admin.generate("lp/p", PROMPT, max_new_tokens=6, ignore_eos=True)
    assert plain.token_ids == result.token_ids and plain.logprobs is None
    # streamed: the same entry rides on each token's event
    events = list(admin.stream_generate("lp/p", PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=3))
    streamed = [e.logprobs for e in events if e.token_id is not None]
    assert all(e is not None for e in streamed) and len(streamed) == 6
    for got, want in zip(streamed, result.logprobs, strict=True):
        assert got is not None and got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token_id for t in got.top] == [t.token_id for t in want.top]
    assert events[-1].is_final and events[-1].logprobs is None
    # logprobs=0: the chosen token's logprob alone
    bare = admin.generate("lp/p", PROMPT, max_new_tokens=2, ignore_eos=True, logprobs=0)
    assert bare.logprobs is not None and [e.top for e in bare.logprobs] == [[], []]


def test_n_with_a_seed_gives_n_choices(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    admin.upload("lp/n", native_prefix_file)
    sampled = {"max_new_tokens": 5, "ignore_eos": True, "temperature": 1.0, "seed": 7}
    result = admin.generate("lp/n", PROMPT, n=3, logprobs=1, **sampled)
    assert result.choices is not None and [c.index for c in result.choices] == [0, 1, 2]
    assert result.completions == result.choices
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in result.choices)
    assert all(c.logprobs is not None and len(c.logprobs) == 5 for c in result.choices)
    first = result.choices[0]
    assert (result.text, result.token_ids, result.logprobs) == (first.text, first.token_ids, first.logprobs)
    assert result.usage.completion_tokens == 15, "usage counts the tokens of every completion"
    # completion i uses seed + i
    second = admin.generate("lp/n", PROMPT, **{**sampled, "seed": 8})
    assert second.token_ids == result.choices[1].token_ids
    again = admin.generate("lp/n", PROMPT, n=3, **sampled)
    assert again.choices is not None
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in result.choices]
    # streamed: each completion's events carry its index and end with its own final event
    events = list(admin.stream_generate("lp/n", PROMPT, n=3, **sampled))
    for choice in result.choices:
        mine = [e for e in events if e.index == choice.index]
        assert [e.token_id for e in mine if e.token_id is not None] == choice.token_ids
        assert mine[-1].is_final and mine[-1].finish_reason == "length"


def test_penalties_and_beam_options_pass_through(admin: PrefixServeClient, native_prefix_file: Path) -> None:
    admin.upload("lp/pen", native_prefix_file)
    options = {"max_new_tokens": 12, "ignore_eos": True}
    plain = admin.generate("lp/pen", PROMPT, **options)
    beams_off = admin.generate(
        "lp/pen", PROMPT, num_beams=1, length_penalty=1.0, early_stopping=False, **options
    )
    assert beams_off.token_ids == plain.token_ids
    # a strong penalty on repeats changes a greedy output that repeats tokens (the tiny model loops)
    assert len(set(plain.token_ids)) < len(plain.token_ids), "premise: the plain output repeats a token"
    penalised = admin.generate("lp/pen", PROMPT, repetition_penalty=100.0, **options)
    assert penalised.token_ids != plain.token_ids
    frequency = admin.generate("lp/pen", PROMPT, frequency_penalty=2.0, presence_penalty=2.0, **options)
    assert frequency.token_ids != plain.token_ids
    with pytest.raises(ValidationError) as info:
        admin.generate("lp/pen", PROMPT, logprobs=21)
    assert info.value.status == 422 and "logprobs" in info.value.message
    with pytest.raises(ValidationError) as info:
        admin.generate("lp/pen", PROMPT, num_beams=17)
    assert info.value.status == 422 and "num_beams" in info.value.message


def test_beam_search_through_the_client(admin: PrefixServeClient) -> None:
    """num_beams passes through; whole and streamed answers agree; options beam search cannot honour are
    refused by name (ValidationError)."""
    whole = admin.generate(
        None, PROMPT, num_beams=4, max_new_tokens=4, length_penalty=0.5, early_stopping=True
    )
    assert whole.finish_reason in ("stop", "length") and len(whole.token_ids) <= 4
    events = list(
        admin.stream_generate(
            None, PROMPT, num_beams=4, max_new_tokens=4, length_penalty=0.5, early_stopping=True
        )
    )
    assert [e.token_id for e in events if e.token_id is not None] == whole.token_ids
    with pytest.raises(ValidationError) as info:
        admin.generate(None, PROMPT, num_beams=4, max_new_tokens=4, logprobs=2)
    assert info.value.status == 422 and "logprobs" in info.value.message


def test_unknown_option_is_refused_by_name(admin: PrefixServeClient) -> None:
    with pytest.raises(ValidationError) as info:
        admin.generate(None, PROMPT, colour="blue")
    assert info.value.status == 422 and "colour" in info.value.message
    with pytest.raises(ValidationError):
        admin.generate(None, PROMPT, stream=True)  # refused before sending: use stream_generate


async def test_async_client_decoding_options(
    server_url: str, admin_key: str, native_prefix_file: Path
) -> None:
    async with AsyncPrefixServeClient(server_url, api_key=admin_key, timeout=30) as client:
        await client.upload("async/lp", native_prefix_file)
        options = {"max_new_tokens": 4, "ignore_eos": True, "temperature": 1.0, "seed": 3, "logprobs": 2}
        result = await client.generate("async/lp", PROMPT, n=2, **options)
        assert result.choices is not None and len(result.choices) == 2
        events = [e async for e in client.stream_generate("async/lp", PROMPT, n=2, **options)]
        for choice in result.choices:
            tokens = [e for e in events if e.index == choice.index and e.token_id is not None]
            assert [e.token_id for e in tokens] == choice.token_ids
            assert choice.logprobs is not None
            assert [e.logprobs.token_id for e in tokens if e.logprobs] == [
                x.token_id for x in choice.logprobs
            ]
        with pytest.raises(ValidationError) as info:
            await client.generate("async/lp", PROMPT, num_beams=4, temperature=1.0)
        assert "temperature" in info.value.message  # beam search does not sample: refused by name
