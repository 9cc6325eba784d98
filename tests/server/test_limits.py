"""Limits against a real prefix-serve: queue depth (429), request timeout (504), clients that go away.

One slot and one waiting place (--max-num-seqs 1 --max-queue 1) and a backbone with 2048 positions and some
width, so that a request for 2000 tokens takes a while. Two servers: `server` with a 2 s request timeout for
the timeout tests, `patient` with a 10-minute one for everything else, so that a slot freed within a test's
ceiling was freed by what the test did (a client going away), not by the timeout. Every check watches the
engine through /metrics (prefixserve_running_requests, prefixserve_queue_depth); nothing asserts a duration.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from edge_support import assert_error, metric, wait_until
from serving import ServerProcess, running_server
from tiny_models import build_gpt2

REQUEST_TIMEOUT = 2.0
CEILING = 30.0  # how long a condition may take to hold on a slow, shared box (a ceiling, never a claim)
LONG = {"prompt": "hello", "max_new_tokens": 2000, "ignore_eos": True}
SHORT = {"prompt": "hello", "max_new_tokens": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(
        tmp_path_factory.mktemp("limits") / "gpt2-2048", n_layer=6, n_embd=256, n_positions=2048
    )


def _serve(model: Path, root: Path, request_timeout: float) -> Iterator[ServerProcess]:
    args = ["--max-num-seqs", "1", "--max-queue", "1", "--request-timeout", str(request_timeout)]
    args += ["--max-model-len", "2048"]
    with running_server(model, str(root / "store"), root / "logs", args=args) as served:
        yield served


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Requests time out after REQUEST_TIMEOUT seconds."""
    yield from _serve(model, tmp_path_factory.mktemp("limits-timeout"), REQUEST_TIMEOUT)


@pytest.fixture(scope="module")
def patient(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Requests time out after 10 minutes: far beyond every ceiling here."""
    yield from _serve(model, tmp_path_factory.mktemp("limits-patient"), 600.0)


def _client(served: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=CEILING) as c:
        yield c
        assert wait_until(lambda: _engine_idle(c), timeout=CEILING), (
            "a request still holds a slot or a queue place"
        )


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    yield from _client(server)


@pytest.fixture
def pclient(patient: ServerProcess) -> Iterator[httpx.Client]:
    yield from _client(patient)


def _running(client: httpx.Client) -> float:
    return metric(client, "prefixserve_running_requests")


def _waiting(client: httpx.Client) -> float:
    return metric(client, "prefixserve_queue_depth")


def _handled(client: httpx.Client, path: str) -> float:
    """Requests to `path` the server has finished handling (any status): counted when the handler returns."""
    text = client.get("/metrics").text
    pattern = rf'^prefixserve_requests_total\{{endpoint="{re.escape(path)}",status="\d+"\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def _engine_idle(client: httpx.Client) -> bool:
    return _running(client) == 0 and _waiting(client) == 0


def _open_stream(stack: ExitStack, server: ServerProcess, body: dict) -> Iterator[str]:
    """Start a streamed generation on its own connection; the stack closes it (a client going away)."""
    c = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
    response = stack.enter_context(c.stream("POST", "/v1/generate", json={**body, "stream": True}))
    assert response.status_code == 200
    return (line for line in response.iter_lines() if line.startswith("data: "))


def _served_next(client: httpx.Client) -> None:
    """The next request is served: on the patient server a leaked slot would hold it past the client's
    timeout (CEILING), since nothing would free the slot for 10 minutes."""
    response = client.post("/v1/generate", json=SHORT)
    assert response.status_code == 200, response.text


def test_full_queue_is_429_with_retry_after(patient: ServerProcess, pclient: httpx.Client) -> None:
    server, client = patient, pclient
    with ExitStack() as stack:
        first = _open_stream(stack, server, LONG)
        next(first)  # running: it holds the only slot
        assert _running(client) == 1
        c = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
        # the second waits in the queue (a streamed response sends its headers at once)
        waiting = stack.enter_context(c.stream("POST", "/v1/generate", json={**LONG, "stream": True}))
        assert waiting.status_code == 200
        assert wait_until(lambda: _waiting(client) == 1, timeout=CEILING)
        for _ in range(3):
            response = client.post("/v1/generate", json=SHORT)
            body = assert_error(response, 429, "tenant_queue_full")
            assert int(response.headers["retry-after"]) >= 1, body
        response = client.post(
            "/v1/completions", json={"model": "gpt2-2048", "prompt": "hi", "max_tokens": 2}
        )
        assert_error(response, 429, "tenant_queue_full")
    # both clients went away: their slot and queue place are freed, the next request is served
    assert wait_until(lambda: _engine_idle(client), timeout=CEILING)
    _served_next(client)


def test_request_timeout_is_504(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.post("/v1/generate", json=LONG)
    assert_error(response, 504, "timeout")
    assert time.monotonic() - started >= REQUEST_TIMEOUT  # not aborted before its time
    assert wait_until(lambda: _engine_idle(client), timeout=CEILING)
    _served_next(client)


def test_time_in_queue_counts_toward_the_timeout(server: ServerProcess, client: httpx.Client) -> None:
    tokens_before = _generated(client)
    with ExitStack() as stack:
        first = _open_stream(stack, server, LONG)
        assert '"token_id"' in next(first)  # holds the slot until its own deadline
        response = client.post("/v1/generate", json=LONG)  # queued for almost all of its time
        assert_error(response, 504, "timeout")
        rest = list(first)  # the first ended at its deadline, before the second's
        assert '"code": "timeout"' in rest[-2], rest[-2:]
        first_tokens = 1 + sum('"token_id"' in line for line in rest)
    assert wait_until(lambda: _engine_idle(client), timeout=CEILING)
    second_tokens = _generated(client) - tokens_before - first_tokens
    # The second got the slot only when the first timed out. Had its queue time not counted, it would then have
    # run a whole REQUEST_TIMEOUT, as the first did, at the same speed (one slot): about as many tokens. Counted,
    # it runs only for the moment between the two deadlines (the time it took to send it after the first).
    assert second_tokens < first_tokens / 2, (first_tokens, second_tokens)


def test_streamed_timeout_ends_with_an_error_event(server: ServerProcess, client: httpx.Client) -> None:
    with client.stream("POST", "/v1/generate", json={**LONG, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"code": "timeout"' in events[-2]


def _generated(client: httpx.Client) -> float:
    return metric(client, "prefixserve_generated_tokens_total")


def test_client_gone_mid_stream_frees_its_slot(patient: ServerProcess, pclient: httpx.Client) -> None:
    client = pclient
    tokens_before = _generated(client)
    with ExitStack() as stack:
        events = _open_stream(stack, patient, LONG)
        for _ in range(3):
            assert '"token_id"' in next(events)
        assert _running(client) == 1
    # freed by the disconnect: the patient server's timeout is 10 minutes away
    assert wait_until(lambda: _running(client) == 0, timeout=CEILING)
    generated = _generated(client) - tokens_before
    time.sleep(0.2)
    assert _generated(client) - tokens_before == generated  # stopped
    assert generated < LONG["max_new_tokens"]  # aborted, not run to its end
    _served_next(client)


@pytest.mark.parametrize("n", [1, 2])
def test_client_gone_while_waiting_whole_response_frees_its_slot(patient: ServerProcess, pclient, n) -> None:
    """A whole response (n completions, one after another in one slot) whose client leaves: every
    completion is aborted, the one running and the one waiting."""
    client = pclient
    tokens_before = _generated(client)
    timeout = httpx.Timeout(30, read=0.5)
    with httpx.Client(base_url=patient.url, timeout=timeout) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/generate", json={**LONG, "n": n})
    assert wait_until(lambda: _engine_idle(client), timeout=CEILING)
    assert _generated(client) - tokens_before < LONG["max_new_tokens"]  # aborted, not run to its end
    _served_next(client)


def test_client_gone_mid_completions_stream_frees_every_prompt(patient: ServerProcess, pclient) -> None:
    client = pclient
    tokens_before = _generated(client)
    body = {"model": "gpt2-2048", "prompt": ["hello", "world"], "max_tokens": 2000, "stream": True}
    with ExitStack() as stack:
        c = stack.enter_context(httpx.Client(base_url=patient.url, timeout=CEILING))
        response = stack.enter_context(c.stream("POST", "/v1/completions", json=body))
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        assert _running(client) == 1 and _waiting(client) == 1  # one slot: the second prompt waits
    assert wait_until(lambda: _engine_idle(client), timeout=CEILING)
    assert _generated(client) - tokens_before < body["max_tokens"]  # the first aborted, the second never ran
    _served_next(client)


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_client_gone_before_the_first_byte_frees_its_slot(patient: ServerProcess, pclient, path: str) -> None:
    """The request is sent and the socket closed at once: the handler may never start streaming."""
    body = {**LONG, "stream": True} if path == "/v1/generate" else {"model": "gpt2-2048", "prompt": "hi"}
    if path == "/v1/completions":
        body |= {"max_tokens": 2000, "stream": True}
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    server, client = patient, pclient
    for _ in range(3):
        before, tokens_before = _handled(client, path), _generated(client)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode() + payload)
        # idle only means something once the server has seen this request through (admitted, then aborted)
        assert wait_until(lambda before=before: _handled(client, path) > before, timeout=CEILING)
        assert wait_until(lambda: _engine_idle(client), timeout=CEILING), (_running(client), _waiting(client))
        assert _generated(client) - tokens_before < 2000  # aborted, not run to its end
    _served_next(client)
