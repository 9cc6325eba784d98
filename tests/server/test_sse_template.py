"""SseTemplate: a stream's per-token event encoded once; each render equals encoding the whole event."""

from __future__ import annotations

import json

import pytest

from server.sse import SseTemplate, json_str, sse


@pytest.mark.parametrize("text", ["hi", 'a"b\\c\n\t\x00', "é😀\u2028", "", "\x00text\x00", "{}[]"])
def test_render_is_the_whole_event_encoded(text: str) -> None:
    mark = SseTemplate.field
    event = SseTemplate({"index": 1, "token_id": mark("id"), "text": mark("text")}, "id", "text")
    assert event.render(42, text) == sse({"index": 1, "token_id": 42, "text": text})
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "acme/e2e"}
    choice = {"text": mark("text"), "index": 0, "logprobs": None, "finish_reason": None}
    chunk = SseTemplate({**head, "choices": [choice]}, "text")
    assert chunk.render(text) == sse({**head, "choices": [{**choice, "text": text}]})


def test_a_field_must_appear_exactly_once() -> None:
    mark = SseTemplate.field
    with pytest.raises(ValueError):
        SseTemplate({"a": "x"}, "text")
    with pytest.raises(ValueError):
        SseTemplate({"a": mark("text"), "b": mark("text")}, "text")


def test_json_str_is_json_dumps() -> None:
    """orjson where its bytes are json.dumps': every ASCII character, alone and among others; and the rest."""
    texts = [chr(c) for c in range(128)] + [
        "".join(chr(c) for c in range(128)),
        "é",
        "a😀b",
        "\u2028",
        "\ud800",
    ]
    for text in texts:
        assert json_str(text) == json.dumps(text).encode(), repr(text)
