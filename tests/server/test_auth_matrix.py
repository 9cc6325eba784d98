"""The tenant matrix against a real prefix-serve with PREFIXSERVE_ADMIN_KEY set.

Tenant `alpha` and tenant `beta` each hold a private prefix; the admin holds a public one (`pub/shared`) and a
public one inside alpha's namespace (`alpha/pinned`). Every cross-tenant attempt must fail exactly as if the
prefix did not exist, and leave the prefix untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from edge_support import ADMIN_KEY, assert_error, metric, native_prefix, put_native
from serving import ServerProcess, running_server

from server.auth import authenticate
from server.errors import ServiceError
from server.settings import Settings

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("auth-matrix")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as served:
        yield served


def _client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with _client(server, ADMIN_KEY) as client:
        assert put_native(client, "alpha/own", native_prefix(seed=1)).status_code == 201
        assert put_native(client, "beta/secret", native_prefix(seed=2)).status_code == 201
        assert put_native(client, "pub/shared", native_prefix(seed=3), public="true").status_code == 201
        assert put_native(client, "alpha/pinned", native_prefix(seed=4), public="true").status_code == 201
        yield client


def _tenant_key(admin: httpx.Client, tenant: str) -> dict:
    response = admin.post(f"/v1/tenants/{tenant}/keys")
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def alpha(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    with _client(server, _tenant_key(admin, "alpha")["key"]) as client:
        yield client


@pytest.fixture(scope="module")
def beta_key(admin: httpx.Client) -> dict:
    return _tenant_key(admin, "beta")


@pytest.fixture(scope="module")
def beta(server: ServerProcess, beta_key: dict) -> Iterator[httpx.Client]:
    with _client(server, beta_key["key"]) as client:
        yield client


def _generate(client: httpx.Client, prefix: str | None, **extra) -> httpx.Response:
    return client.post(
        "/v1/generate", json={"prefix": prefix, "prompt": PROMPT, "max_new_tokens": 4, **extra}
    )


def _complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4})


# -- who are you ------------------------------------------------------------------------------------------
BAD_AUTH = [
    None,
    "Bearer wrong-key",
    "Bearer psk_000000000000_forged",  # shaped like a tenant key, never issued
    f"Basic {ADMIN_KEY}",
    f"Bearer {ADMIN_KEY}x",
    "Bearer",
]


@pytest.mark.parametrize("authorization", BAD_AUTH)
def test_missing_or_wrong_key_is_401_everywhere(server: ServerProcess, admin, authorization) -> None:
    headers = {"authorization": authorization} if authorization else {}
    calls = [
        ("GET", "/v1/prefixes", None),
        ("GET", "/v1/prefixes/alpha/own", None),
        ("DELETE", "/v1/prefixes/alpha/own", None),
        ("PUT", "/v1/prefixes/alpha/own", None),
        ("POST", "/v1/generate", {"prefix": "alpha/own", "prompt": PROMPT}),
        ("POST", "/v1/completions", {"model": "alpha/own", "prompt": PROMPT}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/tenants/alpha/keys", None),
        ("DELETE", "/v1/tenants/alpha/keys/abc", None),
    ]
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        for method, path, body in calls:
            response = client.request(method, path, json=body)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    assert admin.get("/v1/prefixes/alpha/own").status_code == 200  # nothing was deleted


def test_blank_bearer_key_never_authenticates() -> None:
    with pytest.raises(ServiceError) as raised:
        authenticate("Bearer    ", "some-admin-key", store=None)
    assert raised.value.status == 401


def test_blank_admin_key_is_refused_not_auth_off() -> None:
    for blank in ("", "   "):
        with pytest.raises(ValueError, match="blank"):
            Settings(admin_key=blank)


# -- tenant against tenant --------------------------------------------------------------------------------
def _same_as_absent(make_call, present: str, absent: str) -> httpx.Response:
    """Call for an existing foreign prefix and for an absent one (same length): identical but for the id."""
    assert len(present) == len(absent)
    seen, unseen = make_call(present), make_call(absent)
    assert seen.status_code == unseen.status_code in (403, 404), (seen.text, unseen.text)
    assert seen.text.replace(present, absent) == unseen.text
    assert seen.headers.get("content-length") == unseen.headers.get("content-length")
    return seen


def test_foreign_prefix_is_indistinguishable_from_absent(alpha, admin) -> None:
    before = admin.get("/v1/prefixes/beta/secret").json()
    body = native_prefix(seed=9)
    calls = {
        "get": lambda pid: alpha.get(f"/v1/prefixes/{pid}"),
        "delete": lambda pid: alpha.delete(f"/v1/prefixes/{pid}"),
        "replace": lambda pid: put_native(alpha, pid, body),
        "generate": lambda pid: _generate(alpha, pid),
        "generate_stream": lambda pid: _generate(alpha, pid, stream=True),
        "completions": lambda pid: _complete(alpha, pid),
    }
    for name, call in calls.items():
        response = _same_as_absent(call, "beta/secret", "beta/absent")
        assert_error(response, response.status_code), name
    assert admin.get("/v1/prefixes/beta/secret").json() == before  # neither replaced nor deleted
    assert admin.get("/v1/prefixes/beta/absent").status_code == 404  # and nothing created


def test_tenant_lists_only_its_own(alpha, beta) -> None:
    ids = [m["id"] for m in alpha.get("/v1/prefixes").json()["prefixes"]]
    assert ids == ["alpha/own", "alpha/pinned"]
    assert [m["id"] for m in beta.get("/v1/prefixes").json()["prefixes"]] == ["beta/secret"]
    # another tenant's listing: the same 404 whether that tenant exists or not
    seen = alpha.get("/v1/prefixes", params={"tenant": "beta"})
    unseen = alpha.get("/v1/prefixes", params={"tenant": "zeta"})
    assert_error(seen, 404)
    assert seen.text.replace("beta", "zeta") == unseen.text
    models = {m["id"] for m in alpha.get("/v1/models").json()["data"]}
    assert "beta/secret" not in models and {"alpha/own", "pub/shared"} <= models


def test_tenant_cannot_touch_keys(alpha, beta, beta_key) -> None:
    for tenant in ("alpha", "beta"):
        assert_error(alpha.post(f"/v1/tenants/{tenant}/keys"), 403, "forbidden")
        assert_error(alpha.delete(f"/v1/tenants/{tenant}/keys/{beta_key['key_id']}"), 403, "forbidden")
    assert beta.get("/v1/prefixes").status_code == 200  # beta's key still works


def test_own_prefix_full_cycle(alpha) -> None:
    assert put_native(alpha, "alpha/mine", native_prefix(seed=5)).status_code == 201
    assert put_native(alpha, "alpha/mine", native_prefix(seed=6)).status_code == 200
    assert alpha.get("/v1/prefixes/alpha/mine").json()["public"] is False
    assert _generate(alpha, "alpha/mine").status_code == 200
    assert alpha.delete("/v1/prefixes/alpha/mine").status_code == 204
    assert_error(alpha.get("/v1/prefixes/alpha/mine"), 404)


def test_foreign_private_prefix_is_never_loaded(alpha, admin) -> None:
    misses = metric(admin, "prefixserve_prefix_cache_misses_total")
    hits = metric(admin, "prefixserve_prefix_cache_hits_total")
    assert_error(_generate(alpha, "beta/secret"), 404, "prefix_not_found")
    assert metric(admin, "prefixserve_prefix_cache_misses_total") == misses
    assert metric(admin, "prefixserve_prefix_cache_hits_total") == hits
    assert "beta/secret" not in admin.get("/metrics").text


# -- public prefixes --------------------------------------------------------------------------------------
def test_public_prefix_usable_by_every_tenant(alpha, beta) -> None:
    texts = set()
    for client in (alpha, beta):
        response = _generate(client, "pub/shared")
        assert response.status_code == 200, response.text
        texts.add(response.json()["text"])
        assert _complete(client, "pub/shared").status_code == 200
    assert len(texts) == 1  # greedy: the same prefix gives the same text to everyone
    assert _generate(beta, "alpha/pinned").status_code == 200  # public inside another tenant's namespace


def test_public_prefix_changed_by_admin_only(alpha, beta, admin) -> None:
    before = admin.get("/v1/prefixes/pub/shared").json()
    body = native_prefix(seed=8)
    for client in (alpha, beta):
        assert_error(client.delete("/v1/prefixes/pub/shared"), 404)
        assert_error(put_native(client, "pub/shared", body), 404)
        assert_error(client.get("/v1/prefixes/pub/shared"), 404)
    # inside alpha's own namespace alpha may see it, but not change it
    assert alpha.get("/v1/prefixes/alpha/pinned").json()["public"] is True
    assert_error(alpha.delete("/v1/prefixes/alpha/pinned"), 403, "forbidden")
    assert_error(put_native(alpha, "alpha/pinned", body), 403, "forbidden")
    assert_error(put_native(beta, "alpha/pinned", body), 404)
    assert admin.get("/v1/prefixes/pub/shared").json() == before
    assert admin.get("/v1/prefixes/alpha/pinned").json()["public"] is True
    # the admin can
    replaced = put_native(admin, "pub/shared", body, public="true")
    assert replaced.status_code == 200 and replaced.json()["sha256"] != before["sha256"]
    assert put_native(admin, "pub/extra", body, public="true").status_code == 201
    assert admin.delete("/v1/prefixes/pub/extra").status_code == 204


def test_tenant_cannot_upload_public(alpha, admin) -> None:
    assert_error(put_native(alpha, "alpha/wannabe", native_prefix(), public="true"), 403, "forbidden")
    assert_error(put_native(alpha, "beta/wannabe", native_prefix(), public="true"), 404)
    assert_error(admin.get("/v1/prefixes/alpha/wannabe"), 404)
    assert_error(admin.get("/v1/prefixes/beta/wannabe"), 404)


# -- keys ---------------------------------------------------------------------------------------------------
def test_revoked_key_stops_at_once(server: ServerProcess, admin) -> None:
    issued = _tenant_key(admin, "gamma")
    assert issued["key"].startswith("psk_") and issued["tenant"] == "gamma"
    with _client(server, issued["key"]) as gamma:
        assert gamma.get("/v1/prefixes").json() == {"prefixes": [], "next_cursor": None}
        assert_error(admin.delete(f"/v1/tenants/alpha/keys/{issued['key_id']}"), 404, "key_not_found")
        assert gamma.get("/v1/prefixes").status_code == 200  # revoking under the wrong tenant did nothing
        assert admin.delete(f"/v1/tenants/gamma/keys/{issued['key_id']}").status_code == 204
        assert_error(gamma.get("/v1/prefixes"), 401, "unauthorized")
        assert_error(_generate(gamma, None), 401, "unauthorized")
    assert_error(admin.delete(f"/v1/tenants/gamma/keys/{issued['key_id']}"), 404, "key_not_found")


def test_admin_sees_everything(admin) -> None:
    ids = {m["id"] for m in admin.get("/v1/prefixes").json()["prefixes"]}
    assert {"alpha/own", "beta/secret", "pub/shared", "alpha/pinned"} <= ids
    assert _generate(admin, "beta/secret").status_code == 200


def test_metrics_hide_tenant_names_unless_admin(server: ServerProcess, alpha, admin) -> None:
    assert _generate(alpha, "alpha/own").status_code == 200
    assert 'tenant="alpha"' in admin.get("/metrics").text
    for client in (alpha, _client(server, None)):
        text = client.get("/metrics").text
        assert "prefixserve_queue_depth" in text and "prefixserve_requests_total" in text
        assert "alpha" not in text and "prefixserve_tenant_" not in text


def test_invalid_id_error_does_not_depend_on_tenant(alpha) -> None:
    own, foreign = alpha.get("/v1/prefixes/alpha/a%20b"), alpha.get("/v1/prefixes/beta/a%20b")
    assert_error(own, 400, "invalid_prefix_id")
    assert own.text == foreign.text


def test_every_issued_key_works(server: ServerProcess, admin) -> None:
    """A key's secret is urlsafe base64 and holds "_" about half the time; such keys were refused (401)."""
    keys = [_tenant_key(admin, "many")["key"] for _ in range(24)]
    assert any(key.count("_") > 2 for key in keys)  # 1 - 2**-24: the case is exercised
    for key in keys:
        with _client(server, key) as client:
            assert client.get("/v1/prefixes").status_code == 200, key


def test_key_with_underscores_in_secret_authenticates() -> None:
    from server.auth import hash_key, new_key

    record, key = new_key("t")
    key = f"psk_{record.key_id}_a_b_c"
    record = type(record)(record.key_id, "t", hash_key(key), record.created_at)

    class Store:
        def get_key(self, key_id: str):
            return record if key_id == record.key_id else None

    principal = authenticate(f"Bearer {key}", "admin-key", Store())
    assert principal.tenant == "t" and not principal.is_admin
    with pytest.raises(ServiceError):
        authenticate(f"Bearer {key}x", "admin-key", Store())
