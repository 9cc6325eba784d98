"""prefix-serve as a process, over HTTP: PEFT adapters uploaded, served concurrently, PEFT-exact; streaming
equal to the whole response (prefixes, stop strings, GPT-2 and BART, OpenAI chunks token by token); replaced
or deleted prefixes never served stale, also while requests with them are in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from peft_oracle import MAX_NEW, PROMPTS, assert_prefixes_matter, make_peft_adapter, peft_generate
from serving import BackgroundStream, ServerProcess, running_server, upload_peft
from tiny_models import build_gpt2
from transformers import AutoTokenizer


def histogram_counts(metrics_text: str, name: str) -> dict[str, float]:
    counts = {}
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    return counts


async def generate_all(url: str, jobs: list[tuple[str | None, str]]) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(prefix_id: str | None, prompt: str) -> list[int]:
            body = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            response = await client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()["token_ids"]

        return await asyncio.gather(*(one(*job) for job in jobs))


@pytest.fixture(scope="module")
def served(
    peft_case, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """One server per backbone kind with every PEFT adapter of peft_case uploaded."""
    kind, model_dir, adapters, _ = peft_case
    root = tmp_path_factory.mktemp(f"serve-{kind}")
    args = ["--max-num-seqs", "8"]
    with (
        running_server(model_dir, str(root / "store"), root, args=args) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for prefix_id, path in adapters.items():
            response = upload_peft(client, prefix_id, path)
            assert response.status_code == 201, response.text
            meta = response.json()
            assert meta["source"] == "peft" and meta["targets"] == ["decoder"]
        yield server, client


def test_peft_adapters_served_concurrently_are_exact(peft_case, served) -> None:
    kind, model_dir, adapters, expected = peft_case
    server, client = served
    assert_prefixes_matter(expected)
    listed = client.get("/v1/prefixes", params={"tenant": "t"}).json()
    assert [m["id"] for m in listed["prefixes"]] == sorted(adapters)

    keys = [(prefix_id, i) for i in range(len(PROMPTS)) for prefix_id in [None, *adapters]]
    results = asyncio.run(generate_all(server.url, [(p, PROMPTS[i]) for p, i in keys]))
    for (prefix_id, i), got in zip(keys, results, strict=True):
        assert got == expected[prefix_id][i], (prefix_id, PROMPTS[i])

    distinct = histogram_counts(client.get("/metrics").text, "prefixserve_batch_distinct_prefixes")
    assert distinct["+Inf"] > distinct["1.0"], f"no forward step mixed prefixes: {distinct}"
    assert distinct["+Inf"] > distinct["2.0"], f"no forward step carried 3+ prefixes: {distinct}"


def sse_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The data events of a streamed response, [DONE] checked and dropped."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    events = [json.loads(d) for d in data[:-1]]
    assert not any("error" in e for e in events), events
    return events


def assert_stream_equals_whole(client: httpx.Client, body: dict, whole: dict) -> None:
    events = sse_events(client, "/v1/generate", body)
    assert [e["token_id"] for e in events if e.get("token_id") is not None] == whole["token_ids"]
    assert "".join(e.get("text", "") for e in events) == whole["text"]
    assert [e for e in events if e.get("finish_reason")] == [events[-1]], "one final event, at the end"
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["usage"] == whole["usage"]


def pick_stop(tokenizer, token_ids: list[int]) -> str | None:
    """Three characters of the output that straddle the boundary after its middle token: a stop string the
    server can only see whole after holding back the start of it. Not one holding U+FFFD: that is the
    decoder's stand-in for bytes of a character not yet complete, text the server rightly holds back until
    the character is (vLLM does the same), not text a user stops on."""
    middle = len(token_ids) // 2
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    start = len(tokenizer.decode(token_ids[:middle], skip_special_tokens=True)) - 1
    stop = text[max(start, 0) : max(start, 0) + 3]
    return stop if len(stop) == 3 and stop.strip() and "\ufffd" not in stop else None


def stopped_oracle(tokenizer, token_ids: list[int], stop: str) -> tuple[list[int], str]:
    """What a stop string must do to an output: end it at the first token whose text completes the stop
    string (that token included in token_ids), the text cut just before the stop string."""
    for n in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
        if stop in text:
            return token_ids[:n], text[: text.index(stop)]
    raise AssertionError(f"{stop!r} is not in the output")


def test_streaming_matches_whole_response_with_prefixes_and_stops(peft_case, served) -> None:
    kind, model_dir, adapters, expected = peft_case
    _, client = served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_stops = 0
    for prefix_id in [None, *adapters]:
        for i, prompt in enumerate(PROMPTS):
            body = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            whole = client.post("/v1/generate", json=body).json()
            assert whole["token_ids"] == expected[prefix_id][i], (prefix_id, prompt)
            assert whole["text"] == tokenizer.decode(whole["token_ids"], skip_special_tokens=True)
            assert_stream_equals_whole(client, body, whole)

            stop = pick_stop(tokenizer, whole["token_ids"])
            if stop is None:
                continue
            stopped = client.post("/v1/generate", json={**body, "stop": [stop]}).json()
            want_ids, want_text = stopped_oracle(tokenizer, whole["token_ids"], stop)
            assert (stopped["token_ids"], stopped["text"]) == (want_ids, want_text), (prefix_id, prompt, stop)
            assert stopped["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == len(
                want_ids
            )
            assert_stream_equals_whole(client, {**body, "stop": [stop]}, stopped)
            num_stops += 1
    assert num_stops >= 10, f"only {num_stops} outputs had a usable stop string"


def test_stream_interval_streams_equal_whole_and_peft(peft_case, tmp_path: Path) -> None:
    """--stream-interval 3 groups a stream's events three tokens to a write: concurrent streams over several
    prefixes still carry every token's event, equal to PEFT's output and to the whole response, stop strings
    and OpenAI chunks included."""
    kind, model_dir, adapters, expected = peft_case
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = ["--max-num-seqs", "8", "--stream-interval", "3"]
    with (
        running_server(model_dir, str(tmp_path / "store"), tmp_path, args=args) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for prefix_id, path in adapters.items():
            assert upload_peft(client, prefix_id, path).status_code == 201
        jobs = [(prefix_id, i) for prefix_id in [None, *adapters] for i in range(len(PROMPTS))]

        async def stream_all() -> list[list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as aclient:

                async def one(prefix_id: str | None, i: int) -> list[int]:
                    body = {
                        "prefix": prefix_id,
                        "prompt": PROMPTS[i],
                        "max_new_tokens": MAX_NEW,
                        "stream": True,
                    }
                    async with aclient.stream("POST", "/v1/generate", json=body) as response:
                        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]", lines[-2:]
                    events = [json.loads(line[6:]) for line in lines[:-1]]
                    return [e["token_id"] for e in events if e.get("token_id") is not None]

                return await asyncio.gather(*(one(*job) for job in jobs))

        streamed = asyncio.run(stream_all())
        for (prefix_id, i), token_ids in zip(jobs, streamed, strict=True):
            assert token_ids == expected[prefix_id][i], (prefix_id, i)
        prefix_id = next(iter(adapters))
        body = {"prefix": prefix_id, "prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}
        whole = client.post("/v1/generate", json=body).json()
        assert_stream_equals_whole(client, body, whole)
        stop = pick_stop(tokenizer, whole["token_ids"])
        if stop is not None:
            stopped = client.post("/v1/generate", json={**body, "stop": [stop]}).json()
            assert_stream_equals_whole(client, {**body, "stop": [stop]}, stopped)
        completion = {"model": prefix_id, "prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0}
        chunks = sse_events(client, "/v1/completions", completion)
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def token_deltas(tokenizer, token_ids: list[int]) -> list[str]:
    """The text each token adds, as a stream must send it (vLLM's rule): while the text ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD), the token releases nothing and its text waits for a token that ends
    on a whole character; the last token releases everything."""
    deltas, emitted = [], 0
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        safe = len(text) if k == len(token_ids) or not text.endswith("\ufffd") else emitted
        safe = max(safe, emitted)
        deltas.append(text[emitted:safe])
        emitted = safe
    return deltas


def test_openai_streaming_is_token_by_token(peft_case, served) -> None:
    """/v1/completions streams one chunk per token (each the text that token adds), and the chunks add up to
    the whole completion, with a stop string too."""
    kind, model_dir, adapters, _ = peft_case
    _, client = served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backbone_name = client.get("/v1/models").json()["data"][0]["id"]
    for prefix_id in [None, *list(adapters)[:2]]:
        for prompt in PROMPTS[:3]:
            native = client.post(
                "/v1/generate", json={"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            ).json()
            ids = native["token_ids"]
            body = {
                "model": prefix_id or backbone_name,
                "prompt": prompt,
                "max_tokens": MAX_NEW,
                "temperature": 0,
            }
            whole = client.post("/v1/completions", json=body).json()
            assert whole["choices"][0]["text"] == native["text"]
            assert whole["usage"]["completion_tokens"] == len(ids)
            chunks = sse_events(client, "/v1/completions", body)
            texts = [c["choices"][0]["text"] for c in chunks]
            assert [t for t in texts if t] == [t for t in token_deltas(tokenizer, ids) if t], (
                prefix_id,
                prompt,
            )
            assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

            stop = pick_stop(tokenizer, ids)
            if stop is not None:
                stopped = client.post("/v1/completions", json={**body, "stop": stop}).json()
                assert stopped["choices"][0]["text"] == stopped_oracle(tokenizer, ids, stop)[1]
                assert stopped["choices"][0]["finish_reason"] == "stop"
                chunks = sse_events(client, "/v1/completions", {**body, "stop": stop})
                assert "".join(c["choices"][0]["text"] for c in chunks) == stopped["choices"][0]["text"]


@pytest.mark.parametrize("kind", ["gpt2"])
def test_replace_and_delete_are_never_served_stale(kind, tiny_gpt2_dir: Path, tmp_path: Path):
    first = make_peft_adapter(tiny_gpt2_dir, kind, 4, tmp_path / "first", seed=1)
    second = make_peft_adapter(tiny_gpt2_dir, kind, 6, tmp_path / "second", seed=2)
    want_first = peft_generate(tiny_gpt2_dir, kind, first, PROMPTS[:1], MAX_NEW)[0]
    want_second = peft_generate(tiny_gpt2_dir, kind, second, PROMPTS[:1], MAX_NEW)[0]
    assert want_first != want_second
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        body = {"prefix": "t/p", "prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}
        assert upload_peft(client, "t/p", first).status_code == 201
        assert client.post("/v1/generate", json=body).json()["token_ids"] == want_first
        replaced = upload_peft(client, "t/p", second)
        assert replaced.status_code == 200 and replaced.json()["num_virtual_tokens"] == 6
        assert client.post("/v1/generate", json=body).json()["token_ids"] == want_second
        assert client.delete("/v1/prefixes/t/p").status_code == 204
        assert client.post("/v1/generate", json=body).status_code == 404
        assert client.get("/v1/prefixes/t/p").status_code == 404


def start_in_flight(url: str, body: dict, count: int) -> list[BackgroundStream]:
    """`count` streamed requests, each holding a slot and having produced a token (so admitted with the
    prefix version current now) before this returns."""
    streams = [BackgroundStream(url, body) for _ in range(count)]
    for stream in streams:
        assert stream.first_token.wait(60), "a streamed request produced no token"
        assert stream.error is None, stream.error
    return streams


def test_replace_and_delete_while_requests_are_in_flight(tmp_path: Path) -> None:
    """Requests running when their prefix is replaced or deleted finish with the version they started with;
    every request admitted after the change was acknowledged gets the new version (or 404), even while the
    old version is still pinned on the device by the running ones."""
    model = build_gpt2(tmp_path / "gpt2-512", n_positions=512)  # long outputs: the requests stay in flight
    first = make_peft_adapter(model, "gpt2", 4, tmp_path / "first", seed=1)
    second = make_peft_adapter(model, "gpt2", 6, tmp_path / "second", seed=2)
    want_second = peft_generate(model, "gpt2", second, PROMPTS[:1], MAX_NEW)[0]
    short = {"prefix": "t/p", "prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}
    long = {**short, "max_new_tokens": 400, "ignore_eos": True}
    with running_server(model, str(tmp_path / "store"), tmp_path, args=["--max-num-seqs", "8"]) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        assert upload_peft(client, "t/p", first).status_code == 201
        old = client.post("/v1/generate", json=long).json()["token_ids"]

        running = start_in_flight(server.url, long, 4)
        assert upload_peft(client, "t/p", second).status_code == 200
        acknowledged = time.monotonic()
        during = client.post("/v1/generate", json=short).json()["token_ids"]  # the old version still pinned
        assert during == want_second
        assert [s.result() for s in running] == [old] * 4
        assert any(s.finished_at > acknowledged for s in running), "no request was in flight at the replace"
        new = client.post("/v1/generate", json=long).json()["token_ids"]
        assert new != old

        running = start_in_flight(server.url, long, 4)
        assert client.delete("/v1/prefixes/t/p").status_code == 204
        acknowledged = time.monotonic()
        gone = client.post("/v1/generate", json=short)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "prefix_not_found"
        assert [s.result() for s in running] == [new] * 4
        assert any(s.finished_at > acknowledged for s in running), "no request was in flight at the delete"
        assert client.post("/v1/generate", json=short).status_code == 404
