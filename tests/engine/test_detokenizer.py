"""Incremental text: deltas add up to the whole text, stop strings cut it, partial stops are held back."""

from __future__ import annotations

from server.engine.detokenizer import IncrementalText


class CharTokenizer:
    """Token i is chr(i); 0xFFFD-producing ids stand for incomplete bytes."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def feed(text: IncrementalText, s: str) -> list[str]:
    return [text.add(ord(c)) for c in s]


def test_deltas_concatenate_to_the_text():
    text = IncrementalText(CharTokenizer())
    assert "".join(feed(text, "hello world")) + text.flush() == "hello world"


def test_stop_string_cuts_and_stops():
    text = IncrementalText(CharTokenizer(), stop=("END",))
    out = "".join(feed(text, "abcEN"))
    assert out == "abc" and not text.is_stopped  # "EN" held back: it may become END
    out += text.add(ord("D"))
    assert text.is_stopped and out == "abc"


def test_held_back_prefix_released_when_not_a_stop():
    text = IncrementalText(CharTokenizer(), stop=("END",))
    out = "".join(feed(text, "xENy"))
    assert out == "xENy" and not text.is_stopped


def test_incomplete_utf8_is_held_until_complete():
    text = IncrementalText(CharTokenizer())
    assert text.add(ord("a")) == "a"
    assert text.add(0xFFFD) == ""
    assert text.flush() == "\ufffd"
