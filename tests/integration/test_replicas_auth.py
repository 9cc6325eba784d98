"""Auth on, two replicas on one real Redis (our own redis-server): a key revoked on one replica is refused on
the other, and a Redis outage keeps recently verified keys working on resident prefixes (the grace, a
setting: --key-grace-seconds) while everything that needs the store answers 503."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving import ServerProcess, start_server
from test_replicas import CEILING, OwnRedis, tiny_prefix, upload, wait_for

pytestmark = pytest.mark.slow
ADMIN_KEY = "replicas-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHORT_GRACE = 15.0  # r3's grace: long enough to check a key works just after the outage begins
BODY = {"prompt": "the quick brown fox", "max_new_tokens": 8}


@pytest.fixture(scope="module")
def cluster(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OwnRedis, dict]]:
    """r1 and r2 with the default grace (10 minutes), r3 with a grace of SHORT_GRACE seconds."""
    work = tmp_path_factory.mktemp("replicas-auth")
    redis = OwnRedis(work)
    redis.start()
    replicas: dict[str, ServerProcess] = {}
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    grace = {"r1": [], "r2": [], "r3": ["--key-grace-seconds", str(SHORT_GRACE)]}
    try:
        with ThreadPoolExecutor(3) as pool:
            starting = {
                name: pool.submit(
                    start_server,
                    tiny_gpt2_dir,
                    redis.url,
                    work / "logs",
                    {**env, "PREFIXSERVE_REPLICA_NAME": name},
                    grace[name],
                )
                for name in grace
            }
            for name, future in starting.items():
                replicas[name] = future.result()
        yield redis, {name: server.url for name, server in replicas.items()}
    finally:
        for server in replicas.values():
            server.stop()
        redis.kill()


def create_key(url: str, tenant: str) -> tuple[str, str]:
    answer = httpx.post(f"{url}/v1/tenants/{tenant}/keys", headers=ADMIN, timeout=30)
    assert answer.status_code == 201, answer.text
    return answer.json()["key_id"], answer.json()["key"]


def generate(url: str, key: str, prefix_id: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/generate", json={**BODY, "prefix": prefix_id}, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def test_revoked_key_is_refused_on_the_other_replica_also_during_an_outage(
    cluster, tiny_gpt2_dir: Path
) -> None:
    redis, urls = cluster
    r1, r2 = urls["r1"], urls["r2"]
    headers = {**ADMIN, "Content-Type": "application/octet-stream"}
    put = httpx.put(
        f"{r1}/v1/prefixes/acme/rev", content=tiny_prefix(tiny_gpt2_dir, 5), headers=headers, timeout=30
    )
    assert put.status_code == 201, put.text
    key_id, key = create_key(r1, "acme")
    assert generate(r2, key, "acme/rev").status_code == 200  # verified on r2 (and remembered there)
    revoked = httpx.delete(f"{r1}/v1/tenants/acme/keys/{key_id}", headers=ADMIN, timeout=30)
    assert revoked.status_code == 204
    assert_error(generate(r2, key, "acme/rev"), 401, "unauthorized")  # r2 asks the store every time
    assert_error(generate(r1, key, "acme/rev"), 401, "unauthorized")
    redis.kill()
    try:  # r2 saw the key gone in the store: the outage grace must not bring it back
        for url in (r1, r2):
            assert_error(generate(url, key, "acme/rev"), 503, "store_unavailable")
    finally:
        redis.start()
        for url in urls.values():
            wait_for(lambda url=url: httpx.get(f"{url}/readyz").status_code == 200, CEILING, f"{url} ready")


def test_outage_with_auth_on_keeps_recent_keys_on_resident_prefixes(cluster, tiny_gpt2_dir: Path) -> None:
    redis, urls = cluster
    r1, r2, r3 = urls["r1"], urls["r2"], urls["r3"]
    headers = {**ADMIN, "Content-Type": "application/octet-stream"}
    for prefix_id, seed in (("acme/hot", 1), ("acme/cold", 2)):
        answer = upload(r1, prefix_id, tiny_prefix(tiny_gpt2_dir, seed))  # no key: refused
        assert answer.status_code == 401, answer.text
        put = httpx.put(
            f"{r1}/v1/prefixes/{prefix_id}",
            content=tiny_prefix(tiny_gpt2_dir, seed),
            headers=headers,
            timeout=30,
        )
        assert put.status_code == 201, put.text
    _, used = create_key(r1, "acme")  # verified on every replica before the outage
    _, unused = create_key(r1, "acme")  # never verified anywhere
    _, on_r1_only = create_key(r1, "acme")
    assert generate(r1, on_r1_only, "acme/hot").status_code == 200
    before = {}
    for url in (r1, r2, r3):  # r3 last: its short grace starts now
        answer = generate(url, used, "acme/hot")  # acme/hot now resident on every replica
        assert answer.status_code == 200, answer.text
        before[url] = answer.json()["token_ids"]

    redis.kill()
    try:
        # r3 first: its grace (SHORT_GRACE s since the key was checked) is still running
        assert generate(r3, used, "acme/hot").json()["token_ids"] == before[r3]
        for url in (r1, r2):
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
            served = generate(url, used, "acme/hot")  # recent key, resident prefix: still served
            assert served.status_code == 200, served.text
            assert served.json()["token_ids"] == before[url]
            # a prefix that is stored but resident nowhere needs the store
            assert_error(generate(url, used, "acme/cold"), 503, "store_unavailable")
            # a key no replica has verified cannot be checked
            assert_error(generate(url, unused, "acme/hot"), 503, "store_unavailable")
            # a known key id with a wrong secret is still refused
            assert_error(generate(url, used[:-3] + "xyz", "acme/hot"), 401, "unauthorized")
            # the admin key needs no store
            admin = httpx.post(
                f"{url}/v1/generate", json={**BODY, "prefix": "acme/hot"}, headers=ADMIN, timeout=60
            )
            assert admin.status_code == 200 and admin.json()["token_ids"] == before[url]
            assert_error(
                httpx.get(f"{url}/v1/prefixes", headers={"Authorization": f"Bearer {used}"}, timeout=10),
                503,
                "store_unavailable",
            )
        # verified on r1 only: each replica's memory is its own
        assert generate(r1, on_r1_only, "acme/hot").status_code == 200
        assert_error(generate(r2, on_r1_only, "acme/hot"), 503, "store_unavailable")
        # r3's grace runs out (using the key does not renew it; only a check in the store does)
        wait_for(
            lambda: generate(r3, used, "acme/hot").status_code == 503,
            SHORT_GRACE + CEILING,
            "r3's grace ending",
        )
        assert generate(r1, used, "acme/hot").status_code == 200  # r1's ten minutes are not over
    finally:
        redis.start()
    for url in (r1, r2, r3):
        wait_for(lambda url=url: httpx.get(f"{url}/readyz").status_code == 200, CEILING, f"{url} ready")
        assert generate(url, unused, "acme/cold").status_code == 200
        assert generate(url, used, "acme/hot").json()["token_ids"] == before[url]
