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
