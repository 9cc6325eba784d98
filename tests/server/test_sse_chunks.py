"""Streamed responses: events whose successors already wait leave in one write; the events are unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.engine import Engine
from server.settings import Settings

BODY = {"prompt": "hello world", "max_new_tokens": 12, "ignore_eos": True, "stream": True}


class CountingSends:
    """The app, counting the response body messages it sends (one ASGI send is one socket write)."""

    def __init__(self, app) -> None:
        self.app = app
        self.body_sends = 0
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        async def counted(message):
            if message["type"] == "http.response.body" and message.get("body"):
                self.body_sends += 1
                self.bodies.append(message["body"])
            await send(message)

        await self.app(scope, receive, counted if scope["type"] == "http" else send)


def _events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line]


def _stream(
    tmp_path: Path,
    model: Path,
    path: str,
    body: dict,
    hold: bool,
    monkeypatch,
    stream_interval: int = 1,
    paced: bool = False,
) -> tuple[list, int, list[bytes]]:
    """`paced`: each engine step is followed by 20 ms off the GIL, so the reader always keeps up (a tiny model's
    steps take ~1 ms: a reader that falls behind once gathers two events in one write, by design)."""
    if paced:
        step = Engine.step

        def paced_step(self):
            outputs = step(self)
            time.sleep(0.02)
            return outputs

        monkeypatch.setattr(Engine, "step", paced_step)
    if hold:  # the engine hands a request's outputs over only when it is done: the reader is behind
        original = Engine._deliver_all
        held: list = []

        def deliver_when_done(self, items):  # step records (and single outputs: aborts, errors)
            held.extend(items)
            if any(i[1].is_finished if isinstance(i, tuple) else i.progress.finished for i in items):
                original(self, list(held))
                held.clear()

        monkeypatch.setattr(Engine, "_deliver_all", deliver_when_done)
    settings = Settings(
        model=str(model),
        store=str(tmp_path / "store"),
        device="cpu",
        dtype="float32",
        stream_interval=stream_interval,
    )
    counting = CountingSends(create_app(settings))
    with TestClient(counting) as client:
        if path == "/v1/completions":  # the bare backbone, by its name
            body = {**body, "model": client.get("/v1/models").json()["data"][0]["id"]}
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        events = _events(response.text)
    monkeypatch.undo()
    return events, counting.body_sends, counting.bodies


def _comparable(events: list[str]) -> list:
    """Events without what differs from request to request (ids, timestamps)."""
    out = []
    for event in events:
        if event == "[DONE]":
            out.append(event)
            continue
        data = json.loads(event)
        for key in ("id", "created"):
            data.pop(key, None)
        out.append(data)
    return out


def test_events_waiting_together_leave_in_one_write(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch):
    for path, body in (
        ("/v1/generate", BODY),
        ("/v1/completions", {"prompt": BODY["prompt"], "max_tokens": 12, "temperature": 0, "stream": True}),
    ):
        live, _, _ = _stream(
            tmp_path / "live", tiny_gpt2_dir, path, body, hold=False, monkeypatch=monkeypatch
        )
        behind, sends, _ = _stream(
            tmp_path / "held", tiny_gpt2_dir, path, body, hold=True, monkeypatch=monkeypatch
        )
        assert _comparable(behind) == _comparable(live), path
        assert len(live) >= (14 if path == "/v1/generate" else 3)  # generate: an event per token
        assert sends <= 3, f"{path}: {sends} writes for {len(live)} events that all waited at once"


def test_stream_interval_sends_n_tokens_per_write(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch):
    """--stream-interval 4: the same events, a write per 4 tokens (and the rest at the end), also when the
    token count is not a multiple of it and when a completion's text is held back."""
    cases = (
        ("/v1/generate", BODY, 12),
        ("/v1/generate", {**BODY, "max_new_tokens": 10, "n": 2}, 20),
        (
            "/v1/completions",
            {"prompt": BODY["prompt"], "max_tokens": 10, "temperature": 0, "stream": True},
            10,
        ),
    )
    for path, body, tokens in cases:
        live, live_sends, _ = _stream(
            tmp_path / "live", tiny_gpt2_dir, path, body, hold=False, monkeypatch=monkeypatch, paced=True
        )
        grouped, sends, writes = _stream(
            tmp_path / "grouped", tiny_gpt2_dir, path, body, hold=False, monkeypatch=monkeypatch,
            stream_interval=4, paced=True,
        )  # fmt: skip
        assert _comparable(grouped) == _comparable(live), path
        # the first token's event at once, then each completion's in writes of 4 tokens, then [DONE]
        completions = body.get("n", 1)
        assert sends <= 1 + completions * -(-tokens // completions // 4) + 1, (path, sends)
        if path == "/v1/generate":  # an event per token: one write each when live
            assert live_sends >= tokens // completions and sends < live_sends, (path, sends, live_sends)
            assert writes[0].count(b"data: ") == 1, writes[0]  # the first token's event is not held


def test_a_stream_is_stamped_and_counted_by_the_front(tiny_gpt2_dir: Path, tmp_path: Path):
    """SseResponse sends its start through every layer (the request id and replica headers, the request counted
    with its status) and its body past the ones that watch only the start: the same events reach the client."""
    settings = Settings(
        model=str(tiny_gpt2_dir), store=str(tmp_path / "store"), device="cpu", dtype="float32"
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/generate", json=BODY, headers={"X-Request-Id": "stream-1"})
        metrics = client.get("/metrics").text
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["x-request-id"] == "stream-1" and response.headers["x-prefixserve-replica"]
    events = _events(response.text)
    assert events[-1] == "[DONE]" and sum('"token_id": ' in e for e in events) == BODY["max_new_tokens"]
    assert 'prefixserve_requests_total{endpoint="/v1/generate",status="200"} 1.0' in metrics
