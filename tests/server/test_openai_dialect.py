"""The OpenAI-compatible dialect that load generators and harnesses speak (chat completions, vLLM's sampling
extensions, /health, /version, /tokenize, /detokenize), with the official `openai` package, over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from edge_support import ADMIN_KEY, native_prefix, put_native
from openai import OpenAI
from serving import ServerProcess, running_server

from prefix_store.format import Prefix, save_prefix

PREFIX = "acme/e2e"  # has a prompt template
BARE = "acme/bare"  # has none
SOURCE = "name : Blue Spice | Type : coffee shop"
TEMPLATE = " {source} ="


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("dialect")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as served:
        yield served


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        tensor = torch.randn((2, 2, 4, 4, 16), generator=torch.Generator().manual_seed(3))
        templated = save_prefix(Prefix("gpt2", {"decoder": tensor}, prompt_template=TEMPLATE))
        assert put_native(client, PREFIX, templated).status_code == 201
        assert put_native(client, BARE, native_prefix(seed=4)).status_code == 201
        yield client


@pytest.fixture(scope="module")
def oai(server: ServerProcess, admin: httpx.Client) -> OpenAI:
    key = admin.post("/v1/tenants/acme/keys").json()["key"]
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _refusal(admin: httpx.Client, path: str, body: dict, status: int, *names: str) -> str:
    response = admin.post(path, json=body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for name in names:
        assert name in message, (name, message)
    return message


# -- the routes tools call first -----------------------------------------------------------------------------
def test_health_and_version(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    version = httpx.get(server.url + "/version")
    assert version.status_code == 200 and version.json()["version"]


def test_models_carry_vllms_fields(oai: OpenAI, tiny_gpt2_dir: Path) -> None:
    models = {m.id: m.model_dump() for m in oai.models.list()}
    backbone = models[tiny_gpt2_dir.name]
    assert backbone["parent"] is None and backbone["root"] == tiny_gpt2_dir.name
    prefix = models[PREFIX]
    assert prefix["parent"] == tiny_gpt2_dir.name and prefix["root"] == PREFIX
    assert prefix["max_model_len"] == backbone["max_model_len"] - 4  # its 4 virtual tokens take positions


# -- chat completions --------------------------------------------------------------------------------------------
def test_chat_equals_completions_on_the_same_source(oai: OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=PREFIX,
        messages=_user(SOURCE),
        max_completion_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    legacy = oai.completions.create(model=PREFIX, prompt=SOURCE, max_tokens=10, temperature=0, logprobs=2)
    assert chat.object == "chat.completion" and chat.model == PREFIX
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == legacy.choices[0].text
    assert choice.finish_reason == legacy.choices[0].finish_reason
    assert chat.usage.model_dump() == legacy.usage.model_dump()
    tokens = [(t.token, t.logprob) for t in choice.logprobs.content]
    legacy_logprobs = legacy.choices[0].logprobs
    assert tokens == list(zip(legacy_logprobs.tokens, legacy_logprobs.token_logprobs, strict=True))
    assert all(
        len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in choice.logprobs.content
    )


def test_chat_user_text_cannot_inject_special_tokens(oai: OpenAI) -> None:
    # the user's message fills the prompt template as /v1/completions' prompt does: "<|endoftext|>" is text
    source = "name : Blue<|endoftext|>Spice"
    chat = oai.chat.completions.create(model=PREFIX, messages=_user(source), max_tokens=3, temperature=0)
    legacy = oai.completions.create(model=PREFIX, prompt=source, max_tokens=3, temperature=0)
    special = oai.completions.create(model=PREFIX, prompt="name : Blue Spice", max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == legacy.usage.prompt_tokens > special.usage.prompt_tokens
    assert chat.choices[0].message.content == legacy.choices[0].text


def test_chat_stream_gives_the_whole_answer(oai: OpenAI) -> None:
    whole = oai.chat.completions.create(model=PREFIX, messages=_user(SOURCE), max_tokens=12, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=PREFIX,
            messages=[{"role": "user", "content": [{"type": "text", "text": SOURCE}]}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_n_choices_and_continuous_usage(oai: OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=PREFIX,
        messages=_user(SOURCE),
        max_tokens=6,
        temperature=1,
        seed=3,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage.completion_tokens == 18
    chunks = list(
        oai.chat.completions.create(
            model=PREFIX,
            messages=_user(SOURCE),
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert counts and counts == sorted(counts) and all(c.usage is not None for c in chunks[1:])
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_without_a_limit_stops_within_the_context(oai: OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=PREFIX, messages=_user(SOURCE), temperature=0, extra_body={"ignore_eos": True}
    )
    models = {m.id: m.model_dump() for m in oai.models.list()}
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.total_tokens == models[PREFIX]["max_model_len"]


# -- vLLM's extensions ------------------------------------------------------------------------------------------
def test_completions_take_vllms_fields_through_extra_body(oai: OpenAI) -> None:
    extra = {
        "ignore_eos": True,
        "min_tokens": 9,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "stop_token_ids": [],
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "spaces_between_special_tokens": True,
        "min_p": 0.0,
    }
    completion = oai.completions.create(
        model=PREFIX, prompt=SOURCE, max_tokens=9, temperature=0, stop=None, extra_body=extra
    )
    assert completion.usage.completion_tokens == 9 and completion.choices[0].finish_reason == "length"
    streamed = list(
        oai.completions.create(
            model=PREFIX,
            prompt=SOURCE,
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
            extra_body=extra,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    assert all(c.usage is not None for c in streamed) and streamed[-1].usage.completion_tokens == 9


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_tokens_and_stop_token_ids_give_the_lengths_asked(oai: OpenAI, admin, endpoint: str) -> None:
    def run(max_tokens: int, **extra) -> tuple[str, int, str]:
        if endpoint == "chat":
            chat = oai.chat.completions.create(
                model=PREFIX, messages=_user(SOURCE), max_tokens=max_tokens, temperature=0, extra_body=extra
            )
            return (
                chat.choices[0].message.content,
                chat.usage.completion_tokens,
                chat.choices[0].finish_reason,
            )
        done = oai.completions.create(
            model=PREFIX, prompt=SOURCE, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        return done.choices[0].text, done.usage.completion_tokens, done.choices[0].finish_reason

    assert run(12, ignore_eos=True)[1:] == (12, "length")
    body = {"prefix": PREFIX, "prompt": SOURCE, "max_new_tokens": 2, "ignore_eos": True}
    first = admin.post("/v1/generate", json=body).json()["token_ids"][0]
    # the first token as a stop token: it ends the output at once, and min_tokens holds it off
    assert run(12, ignore_eos=True, stop_token_ids=[first])[1:] == (1, "stop")
    _, count, _ = run(12, ignore_eos=True, stop_token_ids=[first], min_tokens=7)
    assert count >= 7
    assert run(7, ignore_eos=True, min_tokens=7)[1:] == (7, "length")


def test_include_stop_str_in_output(oai: OpenAI) -> None:
    full = (
        oai.completions.create(
            model=PREFIX, prompt=SOURCE, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    kept = oai.completions.create(
        model=PREFIX,
        prompt=SOURCE,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


# -- refusals name the field -------------------------------------------------------------------------------
CHAT = {"model": PREFIX, "messages": _user(SOURCE), "max_tokens": 4}
COMPLETION = {"model": PREFIX, "prompt": SOURCE, "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "change", "status", "names"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": "be brief"}, *_user(SOURCE)]},
            400,
            ["messages[0]", "system"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [*_user("hi"), {"role": "assistant", "content": "yes"}, *_user(SOURCE)]},
            400,
            ["messages", "earlier turn"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "x"}]},
            400,
            ["messages[0].role"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            ["messages[0].content[0]"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            400,
            ["messages[0].name"],
        ),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            ["tools"],
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 400, ["response_format"]),
        ("/v1/chat/completions", {"top_logprobs": 2}, 422, ["top_logprobs", "logprobs"]),
        ("/v1/chat/completions", {"model": BARE}, 400, ["prompt_template", "/v1/completions"]),
        ("/v1/chat/completions", {"stream": "true"}, 422, ["stream"]),
        ("/v1/chat/completions", {"min_tokens": 5}, 422, ["min_tokens"]),
        ("/v1/chat/completions", {"min_p": 0.1}, 422, ["min_p"]),
        ("/v1/completions", {"skip_special_tokens": False}, 422, ["skip_special_tokens"]),
        ("/v1/completions", {"spaces_between_special_tokens": False}, 422, ["spaces_between_special_tokens"]),
        ("/v1/completions", {"stop_token_ids": [-1]}, 422, ["stop_token_ids"]),
        ("/v1/completions", {"ignore_eos": "yes"}, 422, ["ignore_eos"]),
        ("/v1/completions", {"min_tokens": 5}, 422, ["min_tokens"]),
        (
            "/v1/completions",
            {"stream_options": {"include_usage": True, "continuous_usage_stats": "1"}, "stream": True},
            422,
            ["continuous_usage_stats"],
        ),
        ("/v1/completions", {"best_of_n": 2}, 422, ["best_of_n"]),
    ],
)
def test_every_refusal_names_the_field(admin, path: str, change: dict, status: int, names: list[str]) -> None:
    body = {**(CHAT if path.endswith("chat/completions") else COMPLETION), **change}
    _refusal(admin, path, body, status, *names)


def test_chat_with_the_bare_backbone_says_what_to_use(admin, tiny_gpt2_dir: Path) -> None:
    body = {**CHAT, "model": tiny_gpt2_dir.name}
    message = _refusal(admin, "/v1/chat/completions", body, 400, "chat template", "/v1/completions")
    assert "backbone" in message


def test_refusals_through_the_openai_package(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(
            model=PREFIX, messages=[{"role": "system", "content": "x"}, *_user(SOURCE)], max_tokens=4
        )
    assert "messages[0]" in raised.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="other/missing", messages=_user(SOURCE), max_tokens=4)


# -- tokenize / detokenize -----------------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(admin, tiny_gpt2_dir: Path) -> None:
    tokenized = admin.post("/tokenize", json={"model": PREFIX, "prompt": SOURCE, "return_token_strs": True})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0 and body["max_model_len"] > 0
    back = admin.post("/detokenize", json={"model": tiny_gpt2_dir.name, "tokens": body["tokens"]})
    assert back.json() == {"prompt": SOURCE}
    _refusal(admin, "/detokenize", {"tokens": [10**9]}, 422, "tokens[0]")
    _refusal(admin, "/detokenize", {"tokens": [1] * 100_000}, 422, "max_model_len")
    _refusal(admin, "/tokenize", {"prompt": 5}, 422, "prompt")
    assert admin.post("/tokenize", json={"model": "other/missing", "prompt": "x"}).status_code == 404


def test_tokenize_refuses_a_text_no_prompt_could_hold(admin) -> None:
    # bounded as a generation's prompt: refused by its length before any tokenizing, not 100,000s of tokens
    _refusal(admin, "/tokenize", {"prompt": "ab " * 200_000}, 422, "characters")


def test_a_chat_template_renders_the_whole_conversation(tiny_gpt2_dir: Path) -> None:
    """A backbone whose tokenizer has a chat template: system messages and earlier turns are honoured, and its
    rendering is the prompt (a prefix's prompt template is not applied on top)."""
    from transformers import AutoTokenizer

    from server.generation import Encoding
    from server.routes.chat import ChatBody, _prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "bye"}]},
    ]
    body = ChatBody.model_validate({"model": PREFIX, "messages": messages})
    prompt = _prompt(body, tokenizer, PREFIX, is_prefix=True)
    assert callable(prompt)
    expected = "system: be brief\nuser: hi\nassistant: hello\nuser: bye\nassistant:"
    assert (
        prompt(TEMPLATE)
        == prompt(None)
        == Encoding(None, expected, special_tokens=True, add_special_tokens=False)
    )
