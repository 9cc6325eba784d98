"""Refusals at the door (server/door.py): a tenant refused now is answered 429 before routing, body or store.

The door only repeats, for a second, what the full path decided; it never admits. A body the full path would
refuse with 422 is how these tests tell that the door answered: the door does not read it.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from edge_support import wait_until
from fastapi.testclient import TestClient
from serving import running_server

from server.app import create_app
from server.door import MAX_KEYS, MEMORY_SECONDS, Door
from server.quotas import TenantSettings
from server.settings import Settings

ADMIN_KEY = "door-admin-key-0123456789"
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"prompt": "hello", "max_new_tokens": 2}
NOT_A_BODY = b"{not json"  # the full path answers 422 invalid_json; the door never reads it


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(model: Path, root: Path, **settings) -> TestClient:
    return TestClient(
        create_app(
            Settings(
                model=str(model),
                store=str(root / "store"),
                device="cpu",
                dtype="float32",
                admin_key=ADMIN_KEY,
                **settings,
            )
        )
    )


def _key(client: TestClient | httpx.Client, tenant: str) -> dict[str, str]:
    issued = client.post(f"/v1/tenants/{tenant}/keys", headers=AS_ADMIN)
    assert issued.status_code == 201, issued.text
    return {"authorization": f"Bearer {issued.json()['key']}"}


def _refusals(client: TestClient, tenant: str, code: str) -> float:
    for line in client.get("/metrics", headers=AS_ADMIN).text.splitlines():
        if line.startswith(f'prefixserve_tenant_refusals_total{{reason="{code}",tenant="{tenant}"}}'):
            return float(line.split()[-1])
    return 0.0


def _raw(client: TestClient, path: str, headers: dict[str, str], body: bytes = NOT_A_BODY) -> httpx.Response:
    return client.post(path, content=body, headers={**headers, "content-type": "application/json"})


# -- the door alone ---------------------------------------------------------------------------------------


def test_the_door_forgets_keys_and_quota_refusals_after_its_memory() -> None:
    clock = Clock()
    door = Door(clock)
    door.remember_key("psk_abc_secret", "alpha", TenantSettings())
    door.remember_quota("alpha", "over", retry_after=30)
    assert door._keys and door._quota
    clock.now += MEMORY_SECONDS + 0.01
    state = type("State", (), {"draining": False})()
    scope = {
        "method": "POST",
        "path": "/v1/generate",
        "headers": [(b"authorization", b"Bearer psk_abc_secret")],
    }
    assert door.refusal(state, scope) is None  # stale: the full path decides again


def test_forgetting_a_key_or_a_tenant() -> None:
    door = Door(Clock())
    door.remember_key("psk_abc_secret", "alpha", TenantSettings())
    door.remember_key("psk_def_secret", "alpha", TenantSettings())
    door.remember_key("psk_123_secret", "beta", TenantSettings())
    door.forget_key("abc")
    assert set(door._keys) == {"psk_def_secret", "psk_123_secret"}
    door.remember_quota("alpha", "over", 5)
    door.forget_tenant("alpha")
    assert set(door._keys) == {"psk_123_secret"} and not door._quota


def test_the_door_holds_a_bounded_number_of_keys() -> None:
    door = Door(Clock())
    for i in range(MAX_KEYS + 5):
        door.remember_key(f"psk_{i:x}_s", "alpha", TenantSettings())
    assert len(door._keys) <= MAX_KEYS


# -- in the server ----------------------------------------------------------------------------------------


def test_a_tenant_over_its_quota_is_refused_at_the_door(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    with _app(tiny_gpt2_dir, tmp_path) as client:
        capped, other = _key(client, "capped"), _key(client, "other")
        put = client.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=AS_ADMIN)
        assert put.status_code == 200
        assert client.post("/v1/generate", json=BODY, headers=capped).status_code == 200
        full_path = client.post("/v1/generate", json=BODY, headers=capped)
        assert full_path.status_code == 429 and full_path.json()["error"]["code"] == "quota_exceeded"
        before = _refusals(client, "capped", "quota_exceeded")

        for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
            at_door = _raw(client, path, capped)
            assert at_door.status_code == 429, at_door.text
            assert at_door.json() == full_path.json()  # the same answer, without reading the body
            assert 1 <= int(at_door.headers["retry-after"]) <= 60
            assert at_door.headers["x-request-id"]
        assert _refusals(client, "capped", "quota_exceeded") == before + 3
        # the door never admits and never refuses anyone else: another tenant is served, a bad body is a 422
        assert client.post("/v1/generate", json=BODY, headers=other).status_code == 200
        assert _raw(client, "/v1/generate", other).status_code == 422
        assert _raw(client, "/v1/generate", AS_ADMIN).status_code == 422
        # only the generate routes: the tenant's own GETs are answered as always
        assert client.get("/v1/tenants/capped", headers=capped).status_code == 200

        # new settings apply to the next request at once
        raised = client.put("/v1/tenants/capped", json={"requests_per_minute": 100}, headers=AS_ADMIN)
        assert raised.status_code == 200
        assert client.post("/v1/generate", json=BODY, headers=capped).status_code == 200


def test_a_revoked_key_is_401_at_once(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    with _app(tiny_gpt2_dir, tmp_path) as client:
        issued = client.post("/v1/tenants/capped/keys", headers=AS_ADMIN).json()
        capped = {"authorization": f"Bearer {issued['key']}"}
        client.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=AS_ADMIN)
        client.post("/v1/generate", json=BODY, headers=capped)
        assert client.post("/v1/generate", json=BODY, headers=capped).status_code == 429
        assert _raw(client, "/v1/generate", capped).status_code == 429  # at the door
        revoked = client.delete(f"/v1/tenants/capped/keys/{issued['key_id']}", headers=AS_ADMIN)
        assert revoked.status_code == 204
        answer = client.post("/v1/generate", json=BODY, headers=capped)
        assert answer.status_code == 401, answer.text


def test_the_door_asks_again_after_its_memory(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    with _app(tiny_gpt2_dir, tmp_path) as client:
        capped = _key(client, "capped")
        client.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=AS_ADMIN)
        client.post("/v1/generate", json=BODY, headers=capped)
        assert client.post("/v1/generate", json=BODY, headers=capped).status_code == 429
        clock = Clock()
        client.app.state.door.clock = clock  # what it remembered is now MEMORY_SECONDS old
        clock.now = 10**9
        assert _raw(client, "/v1/generate", capped).status_code == 422  # the full path read the body


def test_a_full_queue_is_refused_at_the_door(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    # in-process runner: the test holds engine.step, the step of the loop that runs the forward itself
    with _app(tiny_gpt2_dir, tmp_path, max_num_seqs=1, max_queue=1, runner_process=False) as client:
        flood, light = _key(client, "flood"), _key(client, "light")
        engine = client.app.state.engine
        release, step = threading.Event(), engine.step

        def held_step():
            release.wait(60)
            return step()

        answers: list[int] = []

        def send(headers: dict[str, str]) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: answers.append(
                    client.post("/v1/generate", json=BODY, headers=headers).status_code
                )
            )
            thread.start()
            return thread

        engine.step = held_step
        threads = []
        try:
            threads = [send(flood), send(flood)]  # one runs (held), one waits: flood holds the queue
            assert wait_until(lambda: engine.num_waiting + engine.num_running >= 2)
            full_path = client.post("/v1/generate", json=BODY, headers=flood)
            assert full_path.status_code == 429 and full_path.json()["error"]["code"] == "tenant_queue_full"
            at_door = _raw(client, "/v1/generate", flood)
            assert at_door.status_code == 429 and at_door.json()["error"]["code"] == "tenant_queue_full"
            assert at_door.headers["retry-after"] == "1"
            threads.append(send(light))  # the other tenant's share of the queue is still there
            assert wait_until(lambda: engine.num_waiting + engine.num_running >= 3)
        finally:
            release.set()
            engine.step = step
            for thread in threads:
                thread.join(60)
        assert sorted(answers) == [200, 200, 200]
        assert client.post("/v1/generate", json=BODY, headers=flood).status_code == 200  # room again


def _http(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def test_a_connection_goes_on_after_a_refusal_that_left_its_body_unread(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path / "logs", env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            capped = _key(client, "capped")
            client.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=AS_ADMIN)
            client.post("/v1/generate", json=BODY, headers=capped)
            assert client.post("/v1/generate", json=BODY, headers=capped).status_code == 429
        body = b'{"prompt": "' + b"x" * 20000 + b'", "max_new_tokens": 2}'
        refused = (
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {capped['authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            for _ in range(3):
                assert _http(sock, refused)[0] == 429
            status, answer = _http(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (status, answer) == (200, b'{"status":"ok"}')


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_other_methods_on_a_generate_path_are_not_the_doors(
    tiny_gpt2_dir: Path, tmp_path: Path, method: str
) -> None:
    with _app(tiny_gpt2_dir, tmp_path) as client:
        capped = _key(client, "capped")
        client.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=AS_ADMIN)
        client.post("/v1/generate", json=BODY, headers=capped)
        client.post("/v1/generate", json=BODY, headers=capped)
        assert client.request(method, "/v1/generate", headers=capped).status_code == 405
