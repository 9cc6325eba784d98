"""Incremental detokenization with stop strings: text deltas that are safe to stream, O(1) per token.

Runs in the async front (Engine.stream), not on the engine thread: the loop hands over token ids only.
"""

from __future__ import annotations

import codecs
import json
import random
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

_CHECK_SEQUENCES = 64  # random sequences byte_table checks against the tokenizer's own decode
_CHECK_LENGTH = 24


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """Each token id's bytes, when `tokenizer.decode(ids, skip_special_tokens=True)` is exactly the lossy UTF-8
    decoding of the ids' bytes joined (a byte-level BPE: GPT-2's, BART's; special tokens are b""); else None.

    Built from the tokenizer's own vocabulary, then checked against its decode on every single token and on
    random sequences: anything that decodes otherwise (a clean-up step, another decoder) gets None, and
    IncrementalText decodes windows with the tokenizer instead."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    spec = json.loads(backend.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec["model"]["type"] != "BPE":
        return None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's byte-level alphabet
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    table = []
    for token_id in range(len(tokenizer)):
        token = backend.id_to_token(token_id)
        if token is None or token_id in special:
            table.append(b"")
        elif all(c in byte_of for c in token):
            table.append(bytes(byte_of[c] for c in token))
        else:  # the byte-level decoder passes a token with other characters through as its UTF-8
            table.append(token.encode("utf-8"))
    rng = random.Random(0)
    checks = [[i] for i in range(len(table))]
    checks += [[rng.randrange(len(table)) for _ in range(_CHECK_LENGTH)] for _ in range(_CHECK_SEQUENCES)]
    decoded = tokenizer.batch_decode(checks, skip_special_tokens=True)
    for ids, text in zip(checks, decoded, strict=True):
        if b"".join(table[i] for i in ids).decode("utf-8", "replace") != text:
            return None
    return table


class IncrementalText:
    """Turns a growing list of token ids into text deltas.

    With a `table` (byte_table: a byte-level tokenizer) each token appends its bytes to an incremental UTF-8
    decoder, which hands out every complete character and holds an incomplete one until its last byte:
    a list lookup per token, no call into the tokenizer. Without one, each token is decoded in a short
    window (vLLM's incremental detokenizer): the tokens since the last clean boundary, decoded with and without
    the new ones; the difference is the new text, and a window that ends in an incomplete UTF-8 sequence
    (decoded as U+FFFD) waits for the next token. Either way a token costs O(1), and the deltas add up to
    `tokenizer.decode(all ids, skip_special_tokens=True)`.

    Stop strings are searched in the text not yet handed out only: a tail that could be the start of a
    stop string is held back, so a stop string can never begin in text already emitted. When a stop string
    appears, the text is cut before it (after it with `include_stop`, vLLM's include_stop_str_in_output). Before
    `min_tokens` tokens (vLLM's min_tokens) no stop string is looked for.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...] = (),
        table: list[bytes] | None = None,
        include_stop: bool = False,
        min_tokens: int = 0,
    ):
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        self.num_tokens = 0
        self.token_ids: list[int] = []
        self._table = table
        self._partial = b""  # table path: the bytes of a character not complete yet
        # table path: decoded text ending in U+FFFD, held until a whole character follows
        self._undecided = ""
        self._prefix_offset = 0  # token_ids[prefix_offset:read_offset] decode to text already consumed
        self._read_offset = 0
        self._pending = ""  # decoded but held back (a possible stop-string start)
        self.is_stopped = False

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _new_text(self, is_final: bool) -> str:
        """Text the tokens after read_offset add; "" (and wait) while it ends in an incomplete character."""
        before = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.token_ids[self._prefix_offset :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not is_final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return after[len(before) :]

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now final."""
        if self.is_stopped:
            return ""
        if self._table is not None:
            piece = self._table[token_id] if 0 <= token_id < len(self._table) else b""
            # an incremental UTF-8 decoder's step, without its Python wrapper: one call per token
            data = self._partial + piece
            text, used = codecs.utf_8_decode(data, "replace", False)
            self._partial = data[used:]
            new = self._undecided + text
            # text ending in U+FFFD (bytes that are no character) waits, as in the window path: a stream
            # splits its text exactly where that one does
            self._undecided, new = (new, "") if new.endswith("\ufffd") else ("", new)
        else:
            self.token_ids.append(token_id)
            new = self._new_text(is_final=False)
        self.num_tokens += 1
        if not self.stop:
            return new
        if self.num_tokens < self.min_tokens:  # too early to stop: nothing is held back
            text, self._pending = self._pending + new, ""
            return text
        return self._release(self._pending + new, is_final=False)

    def whole(self, token_ids: list[int]) -> str:
        """The text of a request's tokens all at once (a whole response): exactly what add() for each and then
        flush() give. With a byte table and no stop strings, one join and one decode instead of a call per
        token (the incremental decoder and the held U+FFFD only delay text; they never change it)."""
        if self._table is None or self.stop or self.num_tokens:
            return "".join([self.add(t) for t in token_ids]) + self.flush()
        size = len(self._table)
        pieces = [self._table[t] if 0 <= t < size else b"" for t in token_ids]
        self.num_tokens = len(token_ids)
        return b"".join(pieces).decode("utf-8", "replace")

    def flush(self) -> str:
        """Everything not yet handed out (at the end of the request)."""
        if self.is_stopped:
            return ""
        if self._table is not None:
            text, self._partial = codecs.utf_8_decode(self._partial, "replace", True)[0], b""
            new, self._undecided = self._undecided + text, ""
        else:
            new = self._new_text(is_final=True)
        return self._release(self._pending + new, is_final=True)

    def _release(self, text: str, is_final: bool) -> str:
        hits = [(i, i + len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            self.is_stopped = True
            self._pending = ""
            start, end = min(hits)
            return text[: end if self.include_stop else start]
        hold = 0 if is_final else self._stop_start(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper start of some stop string."""
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold
