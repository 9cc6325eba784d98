"""prefix-serve with `--kv-layout paged` as a process, over HTTP: PEFT-exact for concurrent requests sharing
prefixes (GPT-2 and BART), the pool's blocks on /metrics, a replaced prefix never served stale, n choices sharing
their prompt (OpenAI's client); the first also with --runner-process (the front's pool, the child's blocks)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from peft_oracle import MAX_NEW, PROMPTS, make_peft_adapter, peft_generate
from serving import running_server, upload_peft

PAGED = ["--kv-layout", "paged", "--kv-block-size", "4", "--max-num-seqs", "16"]


def metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def generate_all(url: str, jobs: list[tuple[str, str]]) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(prefix_id: str, prompt: str) -> list[int]:
            body = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            response = await client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()["token_ids"]

        return await asyncio.gather(*(one(*job) for job in jobs))


@pytest.mark.parametrize("process", [[], ["--runner-process", "true"]], ids=["one-process", "runner-process"])
def test_paged_server_is_peft_exact_stores_prefixes_once_and_never_serves_stale(
    tiny_gpt2_dir: Path, tmp_path: Path, process: list[str]
):
    first = make_peft_adapter(tiny_gpt2_dir, "gpt2", 5, tmp_path / "first", seed=1)
    second = make_peft_adapter(tiny_gpt2_dir, "gpt2", 9, tmp_path / "second", seed=2)
    want = {
        name: peft_generate(tiny_gpt2_dir, "gpt2", path, PROMPTS, MAX_NEW)
        for name, path in (("first", first), ("second", second))
    }
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path, args=PAGED + process) as server:
        assert "KV pool (paged)" in server.log() and "blocks of 4 positions" in server.log()
        client = httpx.Client(base_url=server.url, timeout=60)
        assert upload_peft(client, "t/a", first).status_code == 201
        assert upload_peft(client, "t/b", second).status_code == 201
        jobs = [("t/a" if i % 2 else "t/b", PROMPTS[i % len(PROMPTS)]) for i in range(20)]
        got = asyncio.run(generate_all(server.url, jobs))
        expected = [
            want["first" if p == "t/a" else "second"][i % len(PROMPTS)] for i, (p, _) in enumerate(jobs)
        ]
        assert got == expected
        text = client.get("/metrics").text
        assert metric(text, "prefixserve_kv_blocks_prefixes") == 2 + 3  # 5 and 9 tokens, each stored once
        assert metric(text, "prefixserve_kv_blocks_total") > metric(text, "prefixserve_kv_blocks_free")
        # each prefix copied into the pool once; every other request found its blocks there
        assert metric(text, "prefixserve_kv_prefix_loads_total") == 2
        assert metric(text, "prefixserve_kv_prefix_hits_total") >= 18
        assert "host copies" in next(
            line for line in text.splitlines() if "HELP prefixserve_prefix_cache_bytes" in line
        )
        assert "prefix cache (--cache-bytes)" in server.log() and "no device copy" in server.log()
        # t/a replaced by the second adapter: a new content, never the old blocks (the pool keys by content: t/b's,
        # resident, are the same values and are read without a copy)
        assert upload_peft(client, "t/a", second).status_code == 200
        body = {"prefix": "t/a", "prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}
        assert client.post("/v1/generate", json=body).json()["token_ids"] == want["second"][0]
        assert metric(client.get("/metrics").text, "prefixserve_kv_prefix_loads_total") == 2


def test_paged_bart_server_is_peft_exact_and_holds_prefixes_and_sources_in_one_pool(
    tiny_bart_dir: Path, tmp_path: Path
):
    """BART: decoder prefixes stored once, every source's cross entries in the same pool, PEFT's tokens."""
    adapters = {
        "t/a": make_peft_adapter(tiny_bart_dir, "bart", 5, tmp_path / "a", seed=3),
        "t/b": make_peft_adapter(tiny_bart_dir, "bart", 9, tmp_path / "b", seed=4),
    }
    want = {
        name: peft_generate(tiny_bart_dir, "bart", path, PROMPTS, MAX_NEW) for name, path in adapters.items()
    }
    with running_server(tiny_bart_dir, str(tmp_path / "store"), tmp_path, args=PAGED) as server:
        assert "KV pool (paged)" in server.log() and "source +" in server.log()
        client = httpx.Client(base_url=server.url, timeout=60)
        for name, path in adapters.items():
            assert upload_peft(client, name, path).status_code == 201
        jobs = [("t/a" if i % 2 else "t/b", PROMPTS[i % len(PROMPTS)]) for i in range(20)]
        got = asyncio.run(generate_all(server.url, jobs))
        assert got == [want[name][i % len(PROMPTS)] for i, (name, _) in enumerate(jobs)]
        text = client.get("/metrics").text
        assert metric(text, "prefixserve_kv_blocks_prefixes") == 2 + 3  # decoder entries only, each once
        for _ in range(50):  # the last rows give their blocks (sources and decoders) back at the next step
            if metric(client.get("/metrics").text, "prefixserve_kv_blocks_sequences") == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("blocks held after every request finished")


def test_openai_n_choices_share_their_prompt_and_each_is_what_it_is_alone(
    tiny_gpt2_dir: Path, tmp_path: Path
):
    """n = 4 through /v1/generate (greedy: PEFT's ids, each choice) and OpenAI's client on /v1/completions
    (seeded sampling with logprobs and a penalty, whole and streamed): choice i == the request alone with seed
    + i. Every block is back afterwards."""
    adapter = make_peft_adapter(tiny_gpt2_dir, "gpt2", 5, tmp_path / "a", seed=1)
    want = peft_generate(tiny_gpt2_dir, "gpt2", adapter, PROMPTS, MAX_NEW)
    with running_server(tiny_gpt2_dir, str(tmp_path / "store"), tmp_path, args=PAGED) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        assert upload_peft(client, "t/a", adapter).status_code == 201
        for i, prompt in enumerate(PROMPTS[:3]):
            body = {"prefix": "t/a", "prompt": prompt, "max_new_tokens": MAX_NEW, "n": 4}
            response = client.post("/v1/generate", json=body).json()
            assert [c["token_ids"] for c in response["choices"]] == [want[i]] * 4
        oai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        sampled = {"model": "t/a", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0.9, "logprobs": 2}
        sampled["presence_penalty"] = 0.5
        group = oai.completions.create(**sampled, n=4, seed=7)
        each = [oai.completions.create(**sampled, seed=7 + i).choices[0] for i in range(4)]
        assert [c.text for c in group.choices] == [c.text for c in each]
        assert [c.logprobs.tokens for c in group.choices] == [c.logprobs.tokens for c in each]
        for ours, theirs in zip(group.choices, each, strict=True):
            assert ours.logprobs.token_logprobs == pytest.approx(theirs.logprobs.token_logprobs, abs=1e-5)
        assert len({c.text for c in group.choices}) > 1
        streamed = ["", "", "", ""]
        for chunk in oai.completions.create(**sampled, n=4, seed=7, stream=True):
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
        assert streamed == [c.text for c in group.choices]
        text = client.get("/metrics").text
        assert metric(text, "prefixserve_kv_blocks_sequences") == 0
