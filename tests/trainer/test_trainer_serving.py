"""A prefix exported by the trainer and served by a real prefix-serve gives the trainer's own greedy tokens
(GPT-2 and BART: positions, masks, all three BART targets and the prompt template must agree)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from serving import running_server

from prefix_store.format import save_prefix
from trainer.backbone import load_backbone
from trainer.data import Example
from trainer.decode import greedy
from trainer.train import TrainConfig, train_prefix

SOURCES = [
    "name : Blue Spice | Type : coffee shop | area : city centre",
    "name : Alimentum | area : city centre | family friendly : no",
    "Aarhus Airport : cityServed : Aarhus , Denmark",
    "the quick brown fox",
    "prefix tuning keeps the backbone frozen",
]
TRAIN = [
    Example(SOURCES[0], "The Blue Spice coffee shop is in the city centre ."),
    Example(SOURCES[1], "There is a place in the city centre , Alimentum , that is not family - friendly ."),
    Example(SOURCES[2], "Aarhus Airport serves Aarhus , Denmark ."),
]
MAX_NEW = 16


async def _generate_all(url: str, prefix_id: str, prompts: list[str]) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(prompt: str) -> list[int]:
            body = {"prefix": prefix_id, "prompt": prompt, "max_new_tokens": MAX_NEW}
            response = await client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()["token_ids"]

        return await asyncio.gather(*(one(p) for p in prompts))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_bart_dir"])
def test_served_prefix_gives_the_trainers_greedy_tokens(fixture: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:  # fmt: skip
    model_dir = request.getfixturevalue(fixture)
    backbone = load_backbone(model_dir)
    config = TrainConfig(max_steps=15, batch_size=3, learning_rate=2e-2, mid_dim=32, num_virtual_tokens=4,
                         show_progress=False)  # fmt: skip
    result = train_prefix(backbone, TRAIN * 2, config)
    prefix = result.tuner.export(prompt_template=result.template)
    expected = [
        greedy(backbone, prefix.targets, backbone.prompt_ids(s, result.template), MAX_NEW) for s in SOURCES
    ]
    assert any(expected), "the trained prefix should generate something"

    with running_server(model_dir, str(tmp_path / "store"), tmp_path) as server:
        response = httpx.put(f"{server.url}/v1/prefixes/t/trained", content=save_prefix(prefix),
                             headers={"Content-Type": "application/octet-stream"}, timeout=60)  # fmt: skip
        assert response.status_code == 201, response.text
        assert response.json()["targets"] == list(prefix.target_names())
        served = asyncio.run(_generate_all(server.url, "t/trained", SOURCES))  # concurrent: batched together
    assert served == expected
