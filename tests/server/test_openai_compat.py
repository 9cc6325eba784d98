"""OpenAI compatibility, with the official `openai` package as the client, against a real prefix-serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from edge_support import ADMIN_KEY, native_prefix, put_native
from openai import OpenAI
from serving import ServerProcess, running_server

PREFIX = "acme/summarise"
FOREIGN = "other/private"
PROMPT = "name : Blue Spice | Type : coffee shop"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("openai")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as served:
        yield served


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        assert put_native(client, PREFIX, native_prefix(seed=1)).status_code == 201
        assert put_native(client, FOREIGN, native_prefix(seed=2)).status_code == 201
        yield client


@pytest.fixture(scope="module")
def acme_key(admin: httpx.Client) -> str:
    return admin.post("/v1/tenants/acme/keys").json()["key"]


@pytest.fixture(scope="module")
def oai(server: ServerProcess, acme_key: str) -> OpenAI:
    """The acme tenant through the official client (no retries: every answer is observed as sent)."""
    return OpenAI(base_url=server.url + "/v1", api_key=acme_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def backbone(tiny_gpt2_dir: Path) -> str:
    return tiny_gpt2_dir.name


def _generate(admin: httpx.Client, prefix: str | None, prompt: str, max_new_tokens: int) -> dict:
    body = {"prefix": prefix, "prompt": prompt, "max_new_tokens": max_new_tokens}
    response = admin.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_backbone_and_usable_prefixes(oai: OpenAI, backbone: str) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert backbone in models and PREFIX in models
    assert FOREIGN not in models  # another tenant's private prefix
    assert models[PREFIX].owned_by == "acme"


@pytest.mark.parametrize("which", ["prefix", "backbone"])
def test_greedy_completion_equals_generate(oai: OpenAI, admin, backbone: str, which: str) -> None:
    model, prefix = (PREFIX, PREFIX) if which == "prefix" else (backbone, None)
    completion = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = _generate(admin, prefix, PROMPT, 12)
    assert completion.model == model
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].text == expected["text"]
    assert completion.choices[0].finish_reason == expected["finish_reason"]
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_prefix_changes_the_output(oai: OpenAI, backbone: str) -> None:
    with_prefix = oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=12, temperature=0)
    bare = oai.completions.create(model=backbone, prompt=PROMPT, max_tokens=12, temperature=0)
    assert with_prefix.choices[0].text != bare.choices[0].text


def test_streaming_gives_the_same_text(oai: OpenAI, admin) -> None:
    expected = _generate(admin, PREFIX, PROMPT, 12)
    chunks = list(
        oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == expected["finish_reason"]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_list_prompts(oai: OpenAI, admin) -> None:
    prompts = [PROMPT, "the quick brown fox", "hello world"]
    completion = oai.completions.create(model=PREFIX, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for choice, prompt in zip(completion.choices, prompts, strict=True):
        assert choice.text == _generate(admin, PREFIX, prompt, 6)["text"]
    streamed = oai.completions.create(model=PREFIX, prompt=prompts, max_tokens=6, temperature=0, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in completion.choices]


def test_seeded_sampling_is_reproducible(oai: OpenAI) -> None:
    def sample() -> str:
        completion = oai.completions.create(
            model=PREFIX, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7
        )
        return completion.choices[0].text

    assert sample() == sample()


def test_stop_strings(oai: OpenAI) -> None:
    full = oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    stopped = oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[: full.index(stop)]


def test_unknown_prefix_is_not_found(oai: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="acme/missing", prompt=PROMPT, max_tokens=4)
    assert raised.value.status_code == 404
    assert raised.value.body["code"] == "prefix_not_found"


def test_unknown_model_name_is_not_found(oai: OpenAI) -> None:
    for model in ("gpt-3.5-turbo-instruct", "", "a/b/c"):
        with pytest.raises(openai.NotFoundError) as raised:
            oai.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert raised.value.body["code"] == "model_not_found"


def test_foreign_prefix_is_not_found(oai: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=FOREIGN, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        list(oai.completions.create(model=FOREIGN, prompt=PROMPT, max_tokens=4, stream=True))


def test_bad_key_is_authentication_error(server: ServerProcess) -> None:
    bad = OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_invalid_arguments_are_4xx(oai: OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=4, top_p=0)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        oai.completions.create(model=PREFIX, prompt=PROMPT * 50, max_tokens=4)
    assert raised.value.body["code"] == "prompt_too_long"


def test_revoked_key_is_authentication_error(server: ServerProcess, admin) -> None:
    issued = admin.post("/v1/tenants/acme/keys").json()
    client = OpenAI(base_url=server.url + "/v1", api_key=issued["key"], max_retries=0, timeout=30)
    assert client.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=2, temperature=0).choices
    assert admin.delete(f"/v1/tenants/acme/keys/{issued['key_id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=PREFIX, prompt=PROMPT, max_tokens=2)
