"""The admin key's usage is its own: a tenant named `admin` neither shares its quota nor its figures with it.

In-process app; the engine's step is held so that the admin's request stays in flight for as long as the test
needs it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from edge_support import wait_until
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import ADMIN, ADMIN_IDENTITY, Principal
from server.settings import Settings

ADMIN_KEY = "identity-admin-key-0123456789"
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"prompt": "hello", "max_new_tokens": 2}


def test_the_admin_identity_is_no_tenant_name() -> None:
    assert ADMIN.identity == ADMIN_IDENTITY != "admin"
    assert Principal(is_admin=False, tenant="admin").identity == "admin"


def test_a_tenant_named_admin_has_a_quota_and_usage_of_its_own(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=str(tiny_gpt2_dir),
        store=str(tmp_path / "store"),
        device="cpu",
        dtype="float32",
        admin_key=ADMIN_KEY,
        runner_process=False,  # the test holds engine.step, the step of the loop that runs the forward itself
    )
    with TestClient(create_app(settings)) as client:
        issued = client.post("/v1/tenants/admin/keys", headers=AS_ADMIN)
        assert issued.status_code == 201, issued.text
        as_tenant = {"authorization": f"Bearer {issued.json()['key']}"}
        assert (
            client.put("/v1/tenants/admin", json={"max_concurrent": 1}, headers=AS_ADMIN).status_code == 200
        )

        engine = client.app.state.engine
        release, step = threading.Event(), engine.step

        def held_step():
            release.wait(60)
            return step()

        def generate(who: str, headers: dict[str, str]) -> threading.Thread:
            def send() -> None:
                answers[who] = client.post("/v1/generate", json=BODY, headers=headers).status_code

            thread = threading.Thread(target=send)
            thread.start()
            return thread

        answers: dict[str, int] = {}
        engine.step = held_step  # the admin's request stays in flight until released
        threads = [generate("admin", AS_ADMIN)]
        try:
            assert wait_until(lambda: ADMIN_IDENTITY in engine.tenant_load())
            shown = client.get("/v1/tenants/admin", headers=as_tenant).json()["usage"]
            assert (shown["running"], shown["queued"]) == (
                0,
                0,
            )  # the admin key's request is not the tenant's
            metrics = client.get("/metrics", headers=AS_ADMIN).text
            assert f'tenant="{ADMIN_IDENTITY}"' in metrics and 'tenant="admin"' not in metrics
            threads.append(generate("tenant", as_tenant))
            assert wait_until(lambda: "admin" in engine.tenant_load() or "tenant" in answers)
            assert "tenant" not in answers, answers  # not refused with 429: its one request is queued
        finally:
            release.set()
            engine.step = step
            for thread in threads:
                thread.join(60)
        assert answers == {"admin": 200, "tenant": 200}
        metrics = client.get("/metrics", headers=AS_ADMIN).text
        assert 'prefixserve_tenant_requests_total{tenant="admin"} 1.0' in metrics
        assert f'prefixserve_tenant_requests_total{{tenant="{ADMIN_IDENTITY}"}} 1.0' in metrics
