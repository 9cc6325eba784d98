"""Decoding options over HTTP against a real prefix-serve, checked against PEFT / HF and OpenAI's client:
logprobs (PEFT's scores), repetition penalty (PEFT's generate), n with seeds, echo, include_usage — while a
hostile tenant's extreme values share the steps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from peft_oracle import MAX_NEW, PROMPTS
from serving import running_server, upload_peft
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW = MAX_NEW  # the length peft_case expects


def peft_scores(
    model_dir: Path, adapter: Path, prompt: str, **generate
) -> tuple[list[int], list[torch.Tensor]]:
    """PEFT's generated ids and processed scores (one [V] row per step), greedy."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **generate,
        )
    ids = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
    return ids, [s[0].float() for s in out.scores]


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
def test_logprobs_penalties_n_echo_over_http(peft_case, tmp_path: Path):
    kind, model_dir, adapters, expected = peft_case
    prefix_id, path = next(iter(adapters.items()))
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    with running_server(
        model_dir, str(tmp_path / "store"), tmp_path, args=["--max-num-seqs", "16"]
    ) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        assert upload_peft(client, prefix_id, path).status_code == 201

        async def everything():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:

                async def post(body):
                    response = await c.post("/v1/generate", json=body)
                    assert response.status_code == 200, response.text
                    return response.json()

                hostile = [
                    post({"prompt": "x", "max_new_tokens": 30, "temperature": 1e-40, "logprobs": 20}),
                    post(
                        {
                            "prompt": "y",
                            "max_new_tokens": 30,
                            "repetition_penalty": 100,
                            "frequency_penalty": 2,
                        }
                    ),
                    post(
                        {"prompt": "z", "max_new_tokens": 30, "temperature": 50, "n": 16, "seed": 2**63 - 1}
                    ),
                ]
                mine = [
                    post({"prefix": prefix_id, "prompt": p, "max_new_tokens": NEW, "logprobs": 5})
                    for p in PROMPTS
                ]
                mine += [
                    post({"prefix": prefix_id, "prompt": p, "max_new_tokens": NEW, "repetition_penalty": 1.5})
                    for p in PROMPTS[:2]
                ]
                results = await asyncio.gather(*mine, *hostile)
                return results[: len(mine)]

        results = asyncio.run(everything())
        for prompt, got in zip(PROMPTS, results, strict=False):
            ids, scores = peft_scores(model_dir, path, prompt)
            assert got["token_ids"] == expected[prefix_id][PROMPTS.index(prompt)]
            assert len(got["logprobs"]) == len(got["token_ids"])
            for step, entry in enumerate(got["logprobs"]):
                want = torch.log_softmax(scores[step], -1)
                assert entry["token_id"] == ids[step]
                assert abs(entry["logprob"] - float(want[ids[step]])) < 1e-4
                top = want.topk(5)
                assert [t["token_id"] for t in entry["top"]] == top.indices.tolist()
                assert all(
                    abs(t["logprob"] - v) < 1e-4
                    for t, v in zip(entry["top"], top.values.tolist(), strict=True)
                )
        for prompt, got in zip(PROMPTS[:2], results[len(PROMPTS) :], strict=True):
            ids, _ = peft_scores(model_dir, path, prompt, repetition_penalty=1.5)
            ids = ids[:-1] if ids and ids[-1] == eos else ids
            assert got["token_ids"] == ids, (prompt, got, ids)

        # n with a seed: completion i is what seed + i gives alone
        body = {
            "prefix": prefix_id,
            "prompt": PROMPTS[0],
            "max_new_tokens": NEW,
            "temperature": 1.0,
            "seed": 40,
        }
        many = client.post("/v1/generate", json={**body, "n": 3}).json()
        assert [c["index"] for c in many["choices"]] == [0, 1, 2]
        for i, choice in enumerate(many["choices"]):
            alone = client.post("/v1/generate", json={**body, "seed": 40 + i}).json()
            assert choice["token_ids"] == alone["token_ids"]
        assert many["token_ids"] == many["choices"][0]["token_ids"]
        assert many["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in many["choices"])

        # streamed logprobs equal the whole response's
        whole = client.post("/v1/generate", json={**body, "logprobs": 3}).json()
        events = []
        with client.stream("POST", "/v1/generate", json={**body, "logprobs": 3, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert [e["logprobs"] for e in events if "token_id" in e] == whole["logprobs"]

        # OpenAI's client: legacy logprobs shape, echo, n, include_usage
        oai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        completion = oai.completions.create(
            model=prefix_id, prompt=PROMPTS[1], max_tokens=NEW, temperature=0, logprobs=2
        )
        choice = completion.choices[0]
        assert (
            len(choice.logprobs.tokens)
            == len(choice.logprobs.token_logprobs)
            == len(choice.logprobs.top_logprobs)
        )
        assert "".join(choice.logprobs.tokens) == choice.text or choice.finish_reason == "stop"
        assert choice.logprobs.text_offset[0] == 0
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
        echoed = oai.completions.create(
            model=prefix_id, prompt=PROMPTS[1], max_tokens=4, temperature=0, echo=True
        )
        assert echoed.choices[0].text.startswith(PROMPTS[1])
        two = oai.completions.create(
            model=prefix_id, prompt=["a", "b"], max_tokens=4, temperature=1, n=2, seed=5
        )
        assert [c.index for c in two.choices] == [0, 1, 2, 3]
        chunks = list(
            oai.completions.create(
                model=prefix_id,
                prompt="a",
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert chunks[-1].choices == []
