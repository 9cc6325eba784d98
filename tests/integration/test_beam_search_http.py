"""Beam search over HTTP against a real prefix-serve: /v1/generate and /v1/completions equal
PeftModel.generate(num_beams=4, do_sample=False) for imported PEFT adapters while greedy and sampled
requests share the steps; streamed beams carry the same tokens; what beams cannot take is a 422 naming it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from peft_oracle import MAX_NEW, PROMPTS, peft_generate
from serving import running_server, upload_peft


def test_beam_search_over_http_equals_peft(peft_case, tmp_path: Path):
    kind, model_dir, adapters, expected_greedy = peft_case
    chosen = dict(list(adapters.items())[:2])
    long_settings = {"length_penalty": 2.0, "early_stopping": True}
    expected = {
        prefix_id: peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW, num_beams=4)
        for prefix_id, path in chosen.items()
    }
    expected_long = {
        prefix_id: peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW, num_beams=4, **long_settings)
        for prefix_id, path in chosen.items()
    }
    with running_server(
        model_dir, str(tmp_path / "store"), tmp_path, args=["--max-num-seqs", "12"]
    ) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        for prefix_id, path in chosen.items():
            assert upload_peft(client, prefix_id, path).status_code == 201

        async def everything():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:

                async def post(path: str, body: dict) -> dict:
                    response = await c.post(path, json=body)
                    assert response.status_code == 200, response.text
                    return response.json()

                jobs = []
                for prefix_id in chosen:
                    for prompt in PROMPTS:
                        base = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
                        jobs.append(post("/v1/generate", {**base, "num_beams": 4}))
                        jobs.append(post("/v1/generate", {**base, "num_beams": 4, **long_settings}))
                        jobs.append(post("/v1/generate", base))
                        jobs.append(post("/v1/generate", {**base, "temperature": 0.9, "seed": 1}))
                return await asyncio.gather(*jobs)

        results = iter(asyncio.run(everything()))
        for prefix_id in chosen:
            for index in range(len(PROMPTS)):
                beam, long, greedy, _ = next(results), next(results), next(results), next(results)
                assert beam["token_ids"] == expected[prefix_id][index], (prefix_id, index)
                assert long["token_ids"] == expected_long[prefix_id][index], (prefix_id, index)
                assert greedy["token_ids"] == expected_greedy[prefix_id][index]
                assert beam["usage"]["completion_tokens"] == len(beam["token_ids"])
                assert beam["finish_reason"] in ("stop", "length")

        prefix_id = next(iter(chosen))
        # OpenAI's completions: temperature 0 is required with beams (its default is 1)
        completion = client.post(
            "/v1/completions",
            json={
                "model": prefix_id,
                "prompt": PROMPTS[1],
                "max_tokens": MAX_NEW,
                "temperature": 0,
                "num_beams": 4,
            },
        )
        assert completion.status_code == 200, completion.text
        whole = client.post(
            "/v1/generate",
            json={"prefix": prefix_id, "prompt": PROMPTS[1], "max_new_tokens": MAX_NEW, "num_beams": 4},
        ).json()
        assert completion.json()["choices"][0]["text"] == whole["text"]
        assert completion.json()["usage"]["completion_tokens"] == len(expected[prefix_id][1])

        # streamed: the tokens arrive when the search is done, the same tokens and text as the whole answer
        events = []
        body = {
            "prefix": prefix_id,
            "prompt": PROMPTS[1],
            "max_new_tokens": MAX_NEW,
            "num_beams": 4,
            "stream": True,
        }
        with client.stream("POST", "/v1/generate", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert [e["token_id"] for e in events if "token_id" in e] == whole["token_ids"]
        assert "".join(e["text"] for e in events) == whole["text"]
        assert events[-1]["finish_reason"] == whole["finish_reason"]

        # refused at the door, naming what beams cannot take
        refusals = [
            ("/v1/completions", {"model": prefix_id, "prompt": "x", "num_beams": 4}, "temperature"),
            ("/v1/generate", {"prompt": "x", "num_beams": 4, "temperature": 0.5}, "temperature"),
            ("/v1/generate", {"prompt": "x", "num_beams": 4, "top_k": 5}, "top_k"),
            ("/v1/generate", {"prompt": "x", "num_beams": 4, "logprobs": 2}, "logprobs"),
            ("/v1/generate", {"prompt": "x", "num_beams": 4, "stop": ["a"]}, "stop"),
            ("/v1/generate", {"prompt": "x", "num_beams": 2, "n": 2}, "n > 1"),
            ("/v1/generate", {"prompt": "x", "num_beams": 16}, "max-num-seqs"),
            ("/v1/generate", {"prompt": "x", "num_beams": 17}, "num_beams"),
        ]
        for path, refused, name in refusals:
            response = client.post(path, json=refused)
            assert response.status_code == 422, (refused, response.text)
            assert name in response.text, (refused, response.text)
