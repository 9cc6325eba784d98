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


class CountingTokenizer(CharTokenizer):
    def __init__(self) -> None:
        self.longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_token_decodes_a_short_window_not_the_whole_text():
    tokenizer = CountingTokenizer()
    text = IncrementalText(tokenizer, stop=("never",))
    out = "".join(feed(text, "x" * 2000)) + text.flush()
    assert out == "x" * 2000 and tokenizer.longest <= 2


def test_matches_whole_decode_on_a_byte_level_tokenizer(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    sample = "the café — naïve 東京 🙂 coffee shop, near the river. " * 3
    ids = tokenizer(sample)["input_ids"] + [tokenizer.eos_token_id]
    text = IncrementalText(tokenizer)
    deltas = [text.add(i) for i in ids] + [text.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)  # a split character is held until it is whole


def test_stop_string_spanning_tokens_and_held_text(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ids = tokenizer("name : Blue Spice | area : city centre")["input_ids"]
    text = IncrementalText(tokenizer, stop=("Spice |", "zzz"))
    out = "".join(text.add(i) for i in ids)
    assert text.is_stopped and out == "name : Blue " and text.flush() == ""
