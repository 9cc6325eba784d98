"""Incremental detokenization with stop strings: text deltas that are safe to stream."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """Turns a growing list of token ids into text deltas.

    Holds back what may still change: a trailing incomplete UTF-8 sequence (decoded as U+FFFD), and a
    tail that could be the start of a stop string. When a stop string appears, the text is cut before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.num_emitted = 0  # characters of self.text already handed out
        self.is_stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now final."""
        self.token_ids.append(token_id)
        self.text = self._decode()
        if self.stop:
            search_from = max(0, self.num_emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.is_stopped = True
                return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        hold = 0
        for stop in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == stop[:k]:
                    hold = max(hold, k)
                    break
        safe = max(safe - hold, self.num_emitted)
        delta = self.text[self.num_emitted : safe]
        self.num_emitted = safe
        return delta

    def flush(self) -> str:
        """Everything not yet handed out (at the end of the request)."""
        delta = self.text[self.num_emitted :]
        self.num_emitted = len(self.text)
        return delta
