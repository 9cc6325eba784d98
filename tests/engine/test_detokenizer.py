"""Incremental text: deltas add up to the whole text, stop strings cut it, partial stops are held back."""

from __future__ import annotations

import random

import pytest

from server.engine.detokenizer import IncrementalText, byte_table


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


def _random_ids(tokenizer, rng, count: int) -> list[int]:
    return [rng.randrange(len(tokenizer)) for _ in range(count)]


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_byte_table_decodes_as_the_tokenizer_does(family, tiny_gpt2_dir, tiny_bart_dir):
    """Byte-level BPE (both families): the table path equals the tokenizer's own decode and the window path,
    token by token, on random ids (split and invalid UTF-8, special tokens) with and without stop strings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir if family == "gpt2" else tiny_bart_dir)
    table = byte_table(tokenizer)
    assert table is not None and len(table) == len(tokenizer)
    rng = random.Random(0)
    for _ in range(150):
        ids = _random_ids(tokenizer, rng, rng.randint(1, 40)) + [tokenizer.eos_token_id]
        for stop in [(), ("e",), ("th", "zz")]:
            fast, windows = IncrementalText(tokenizer, stop, table), IncrementalText(tokenizer, stop)
            fast_deltas = [fast.add(i) for i in ids] + [fast.flush()]
            window_deltas = [windows.add(i) for i in ids] + [windows.flush()]
            assert fast_deltas == window_deltas  # the same text, split at the same tokens
            assert fast.is_stopped == windows.is_stopped
            if not stop:
                assert "".join(fast_deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_table_holds_a_split_character_until_it_is_whole(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    table = byte_table(tokenizer)
    ids = tokenizer("café 東京 🙂")["input_ids"]
    text = IncrementalText(tokenizer, table=table)
    deltas = [text.add(i) for i in ids] + [text.flush()]
    assert "".join(deltas) == "café 東京 🙂" and all("\ufffd" not in d for d in deltas)
    # an out-of-vocabulary id (a model whose embedding is larger than its tokenizer) decodes to nothing
    assert IncrementalText(tokenizer, table=table).add(len(table) + 5) == ""


def test_byte_table_refuses_a_tokenizer_that_decodes_otherwise(tiny_gpt2_dir):
    """A tokenizer without a backend, one with clean-up, or one whose decode is not the byte join: None (the
    window path decodes with the tokenizer itself)."""
    from transformers import AutoTokenizer

    assert byte_table(CharTokenizer()) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.clean_up_tokenization_spaces = True
    assert byte_table(tokenizer) is None

    class Shouting(type(tokenizer)):  # type: ignore[misc]
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

    shouting = Shouting.from_pretrained(tiny_gpt2_dir)
    assert byte_table(shouting) is None


def test_include_stop_keeps_the_stop_string():
    text = IncrementalText(CharTokenizer(), stop=("END",), include_stop=True)
    out = "".join(feed(text, "abcENDxyz"))
    assert text.is_stopped and out == "abcEND"


def test_no_stop_string_before_min_tokens():
    text = IncrementalText(CharTokenizer(), stop=("b",), min_tokens=3)
    out = "".join(feed(text, "abcab"))  # the "b" at token 2 is before the minimum; the one at token 5 stops
    assert text.is_stopped and out == "abca"


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_whole_is_what_the_deltas_add_up_to(family, tiny_gpt2_dir, tiny_bart_dir):
    """A whole response's text at once (one join and decode with a byte table) equals its deltas and flush,
    split characters, special tokens and ids past the vocabulary included; with stop strings too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir if family == "gpt2" else tiny_bart_dir)
    table = byte_table(tokenizer)
    assert table is not None
    rng = random.Random(1)
    sample = tokenizer("the café — naïve 東京 🙂 coffee shop")["input_ids"]
    for ids in [sample, [], *(_random_ids(tokenizer, rng, 40) + [len(tokenizer) + 5] for _ in range(50))]:
        for stop in (("e",), ()):
            streamed = IncrementalText(tokenizer, stop, table)
            deltas = "".join(streamed.add(i) for i in ids) + streamed.flush()
            assert IncrementalText(tokenizer, stop, table).whole(ids) == deltas
        windows = IncrementalText(tokenizer, (), None)  # no table: each token in its window, as before
        in_windows = "".join(windows.add(i) for i in ids) + windows.flush()
        assert IncrementalText(tokenizer, (), None).whole(ids) == in_windows
