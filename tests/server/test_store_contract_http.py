"""The store's promises over HTTP, on a real prefix-serve with each store (directory and Redis):

- GET /v1/prefixes walks every prefix exactly once, in id order, at every page size, for the admin and for a
  tenant; /v1/models lists a tenant's own prefixes and the public ones once each, in id order.
- The admin's publish racing the tenant's own write of the same prefix is never undone: the prefix ends
  public with the admin's content, and the tenant either wrote first or got 403 `forbidden`.
"""

from __future__ import annotations

import functools
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from edge_support import ADMIN_KEY, assert_error, native_prefix, put_native
from serving import ServerProcess, running_server

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REDIS_URL = "redis://127.0.0.1:6379/0"
IDS = [
    f"{tenant}/{name}"
    for tenant in ("a", "a-b", "a.b", "a_b", "a0", "b")
    for name in ("x", "x-1", "x.1", "x_1", "x1", "y")
]
PUBLIC = {"a-b/x.1", "a_b/y", "b/x"}


@pytest.fixture(scope="module", params=["local", "redis"])
def server(
    request: pytest.FixtureRequest, tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp(f"store-http-{request.param}")
    namespace = f"test-{secrets.token_hex(6)}"
    store = str(root / "store") if request.param == "local" else f"{REDIS_URL}?namespace={namespace}"
    with running_server(
        tiny_gpt2_dir, store, root / "logs", env={"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    ) as served:
        with httpx.Client(base_url=served.url, headers=ADMIN, timeout=60) as admin:
            for i, prefix_id in enumerate(reversed(IDS)):
                public = {"public": "true"} if prefix_id in PUBLIC else {}
                assert put_native(admin, prefix_id, native_prefix(seed=i), **public).status_code == 201
        yield served
    if request.param == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def tenant_client(server: ServerProcess, tenant: str) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin:
        issued = admin.post(f"/v1/tenants/{tenant}/keys")
    assert issued.status_code == 201, issued.text
    return httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {issued.json()['key']}"}, timeout=60
    )


def race(*calls: Callable[[], object]) -> list[object]:
    """Run the calls on threads released together; their results (or the exceptions raised), in order."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        start.wait()
        try:
            results[i] = call()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def walk(client: httpx.Client, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/prefixes", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["prefixes"]) <= limit
        seen += [m["id"] for m in page["prefixes"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def test_listing_walks_every_prefix_once_in_id_order(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin:
        first = admin.get("/v1/prefixes", params={"limit": 4}).json()
        assert [m["id"] for m in first["prefixes"]] == sorted(IDS)[:4]
        for limit in (1, 2, 3, 5, 7, 35, 36, 37, 1000):
            assert walk(admin, limit) == sorted(IDS), limit
    with tenant_client(server, "a") as tenant:
        own = sorted(i for i in IDS if i.startswith("a/"))
        for limit in (1, 2, 5, 100):
            assert walk(tenant, limit) == own, limit
        models = [m["id"] for m in tenant.get("/v1/models").json()["data"][1:]]
        assert models == sorted(set(own) | PUBLIC)  # its own and the public ones, once each, in id order


def test_a_publish_racing_the_tenants_write_is_never_undone(server: ServerProcess) -> None:
    content_a, content_b = native_prefix(seed=101), native_prefix(seed=102)
    with (
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin,
        tenant_client(server, "alpha") as alpha,
    ):
        for trial in range(30):
            prefix_id = f"alpha/vis{trial}"
            if trial % 2:
                assert put_native(alpha, prefix_id, content_b).status_code == 201
            admin_answer, tenant_answer = race(
                functools.partial(put_native, admin, prefix_id, content_a, public="true"),
                functools.partial(put_native, alpha, prefix_id, content_b),
            )
            assert isinstance(admin_answer, httpx.Response) and isinstance(tenant_answer, httpx.Response)
            assert admin_answer.status_code in (200, 201), admin_answer.text
            if tenant_answer.status_code == 403:  # the publish came first: the tenant may not replace it
                assert_error(tenant_answer, 403, "forbidden")
            else:  # the tenant's write came first; the publish replaced it
                assert tenant_answer.status_code in (200, 201), tenant_answer.text
            final = admin.get(f"/v1/prefixes/{prefix_id}").json()
            assert (final["public"], final["sha256"]) == (True, admin_answer.json()["sha256"]), trial
        # afterwards the tenant may neither replace nor delete it
        assert_error(put_native(alpha, "alpha/vis0", content_b), 403, "forbidden")
        assert_error(alpha.delete("/v1/prefixes/alpha/vis0"), 403, "forbidden")
