"""prefix-serve as a process, over HTTP: PEFT adapters uploaded, served concurrently, PEFT-exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from peft_oracle import MAX_NEW, PROMPTS, make_peft_adapter, peft_generate
from serving import running_server, upload_peft


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


def test_peft_adapters_served_concurrently_are_exact(peft_case, tmp_path: Path):
    kind, model_dir, adapters, expected = peft_case
    with running_server(model_dir, str(tmp_path / "store"), tmp_path, args=["--max-num-seqs", "8"]) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        for prefix_id, path in adapters.items():
            response = upload_peft(client, prefix_id, path)
            assert response.status_code == 201, response.text
            meta = response.json()
            assert meta["source"] == "peft" and meta["targets"] == ["decoder"]
        listed = client.get("/v1/prefixes", params={"tenant": "t"}).json()
        assert [m["id"] for m in listed["prefixes"]] == sorted(adapters)

        keys = [(prefix_id, i) for i in range(len(PROMPTS)) for prefix_id in [None, *adapters]]
        results = asyncio.run(generate_all(server.url, [(p, PROMPTS[i]) for p, i in keys]))
        for (prefix_id, i), got in zip(keys, results, strict=True):
            assert got == expected[prefix_id][i], (prefix_id, PROMPTS[i])

        distinct = histogram_counts(client.get("/metrics").text, "prefixserve_batch_distinct_prefixes")
        assert distinct["+Inf"] > distinct["1.0"], f"no forward step mixed prefixes: {distinct}"
        assert distinct["+Inf"] > distinct["2.0"], f"no forward step carried 3+ prefixes: {distinct}"


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


def test_streaming_matches_whole_response(tiny_gpt2_dir: Path, tmp_path: Path):
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        body = {"prompt": PROMPTS[1], "max_new_tokens": 12}
        whole = client.post("/v1/generate", json=body).json()
        events = []
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        import json

        parsed = [json.loads(e) for e in events[:-1]]
        tokens = [e["token_id"] for e in parsed if "token_id" in e]
        assert tokens == whole["token_ids"]
        assert "".join(e.get("text", "") for e in parsed) == whole["text"]
        assert parsed[-1]["finish_reason"] == whole["finish_reason"]
        assert parsed[-1]["usage"] == whole["usage"]
