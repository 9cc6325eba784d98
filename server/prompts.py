"""A request's prompt into token ids: the prefix's template filled with the client's text, bounded first.

- Bounded before any work: no token covers more characters than the vocabulary's longest token, so a prompt
  longer than max_model_len x that many characters cannot fit; it is refused by its length alone, before the
  template is filled or anything is tokenized (the template's own characters counted, the text once per
  `{source}`).
- Special tokens: those the template spells (GPT-2's "<|endoftext|>" separator) stay special; in the client's
  text they are plain text unless the request asks for them, so a user cannot inject control tokens. When the
  client's text spells none, the ids are exactly those of tokenizing the whole filled prompt (what HF's and
  PEFT's generate are given).
- Off the event loop in two lanes, each a tokenizer copy on its own thread: prompts up to SMALL_PROMPT_CHARS,
  and longer ones one at a time, so a tenant's long prompts never queue ahead of another tenant's short one
  (nor take the threads the store calls run on).
"""

from __future__ import annotations

import asyncio
import copy
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.engine.engine import PromptTooLong

SMALL_PROMPT_CHARS = 4096
PLACEHOLDER = "{source}"


class Prompts:
    def __init__(self, tokenizer: Any, bos_token_id: int | None, max_model_len: int):
        self.bos_token_id = bos_token_id
        self.max_model_len = max_model_len
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.max_chars = max_model_len * max(1, longest)
        specials = sorted({str(t) for t in tokenizer.all_special_tokens}, key=len, reverse=True)
        self._specials = [s for s in specials if s]
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._head, self._tail = _added_around(tokenizer)
        self._lanes = [_Lane(tokenizer, "small"), _Lane(tokenizer, "large")]

    def check_length(self, template: str | None, source: str) -> None:
        """Raise PromptTooLong when the filled prompt cannot fit in any case (counted, not built)."""
        num_chars = filled_length(template, source)
        if num_chars > self.max_chars:
            raise PromptTooLong(
                f"the prompt is {num_chars} characters (with its prefix's template): more than this backbone's "
                f"{self.max_model_len} positions can hold ({self.max_chars} characters at most); shorten it"
            )

    async def encode(
        self, template: str | None, source: str, special_tokens: bool = False, add_special_tokens: bool = True
    ) -> list[int]:
        """Check the length, then tokenize off the event loop in the lane the prompt's length picks;
        `add_special_tokens` False: none of the tokenizer's own (BOS, ...) around the text."""
        self.check_length(template, source)
        lane = self._lanes[filled_length(template, source) > SMALL_PROMPT_CHARS]
        return await lane.run(self._encode, template, source, special_tokens, add_special_tokens)

    def _encode(
        self,
        tokenizer: Any,
        template: str | None,
        source: str,
        special_tokens: bool,
        add_special_tokens: bool = True,
    ) -> list[int]:
        filled = source if template is None else template.replace(PLACEHOLDER, source)
        if special_tokens or not self._source_spells_special(template, filled):
            token_ids = list(tokenizer(filled, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            token_ids = self._encode_parts(tokenizer, template, source, add_special_tokens)
        if not token_ids and self.bos_token_id is not None:
            token_ids = [self.bos_token_id]  # what HF generate does with an empty prompt
        return token_ids

    def _source_spells_special(self, template: str | None, filled: str) -> bool:
        """Whether the client's text adds a special token to the filled prompt (alone or with the template)."""
        if self._special_re is None:
            return False
        parts = [""] if template is None else template.split(PLACEHOLDER)
        in_template = sum(len(self._special_re.findall(part)) for part in parts)
        return len(self._special_re.findall(filled)) > in_template

    def _encode_parts(
        self, tokenizer: Any, template: str | None, source: str, add_special_tokens: bool
    ) -> list[int]:
        """The template's special tokens as themselves, every run of text between them (the client's text
        included) tokenized with special tokens read as plain text: how the tokenizer itself splits on them."""
        assert self._special_re is not None
        ids: list[int] = []
        text = ""
        parts = [PLACEHOLDER] if template is None else re.split(f"({re.escape(PLACEHOLDER)})", template)
        for part in parts:
            if part == PLACEHOLDER:
                text += source
                continue
            pieces = self._special_re.split(part)
            for special, piece in zip(self._special_re.findall(part), pieces[1:], strict=True):
                ids += _plain(tokenizer, text + pieces[0]) + [tokenizer.convert_tokens_to_ids(special)]
                text, pieces[0] = piece, ""
            text += pieces[0]
        ids += _plain(tokenizer, text)
        return [*self._head, *ids, *self._tail] if add_special_tokens else ids

    def close(self) -> None:
        for lane in self._lanes:
            lane.executor.shutdown(wait=False, cancel_futures=True)


class _Lane:
    """One thread with its own tokenizer copy: a HF fast tokenizer shared by threads can fail with "Already
    borrowed" when calls overlap, and one thread runs the lane's prompts one at a time, in arrival order."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"prefixserve-tokenize-{name}")

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, self.tokenizer, *args)


def filled_length(template: str | None, source: str) -> int:
    """Characters of the template filled with `source`, without building it."""
    if template is None:
        return len(source)
    count = template.count(PLACEHOLDER)
    return len(template) + count * (len(source) - len(PLACEHOLDER))


def _plain(tokenizer: Any, text: str) -> list[int]:
    """Text's ids with special tokens read as plain text and none added around it."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _added_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text's own (BART's <s> ... </s>; none for GPT-2)."""
    probe = "a"
    inner = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(probe)["input_ids"])
    for start in range(len(whole) - len(inner) + 1):
        if whole[start : start + len(inner)] == inner:
            return whole[:start], whole[start + len(inner) :]
    return [], []
