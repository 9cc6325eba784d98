"""Incremental detokenization with stop strings: text deltas that are safe to stream, O(1) per token.

Runs in the async front (Engine.stream), not on the engine thread: the loop hands over token ids only.
"""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """Turns a growing list of token ids into text deltas.

    Each token is decoded in a short window (vLLM's incremental detokenizer): the tokens since the last
    clean boundary, decoded with and without the new ones; the difference is the new text. A window that
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD) waits for the next token. So a token costs a
    decode of a few tokens, never of the whole output.

    Stop strings are searched in the text not yet handed out only: a tail that could be the start of a
    stop string is held back, so a stop string can never begin in text already emitted. When a stop string
    appears, the text is cut before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
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
        self.token_ids.append(token_id)
        return self._release(self._pending + self._new_text(is_final=False), is_final=False)

    def flush(self) -> str:
        """Everything not yet handed out (at the end of the request)."""
        if self.is_stopped:
            return ""
        return self._release(self._pending + self._new_text(is_final=True), is_final=True)

    def _release(self, text: str, is_final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.is_stopped = True
            self._pending = ""
            return text[: min(hits)]
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
