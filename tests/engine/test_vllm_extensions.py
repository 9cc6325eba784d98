"""vLLM's sampling extensions in the engine: min_tokens and stop_token_ids, greedy, against HF generate's
min_new_tokens and eos_token_id list (the same masking and stopping rules)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_gpt2_dir: Path):
    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig(max_num_seqs=4))
    engine.start()
    yield engine
    engine.stop()


def _run(engine: Engine, params: SamplingParams) -> tuple[list[int], str | None]:
    async def main() -> tuple[list[int], str | None]:
        request = engine.add(engine.tokenize(PROMPT), params)
        outputs = [o async for o in engine.stream(request)]
        return [o.token_id for o in outputs if o.token_id is not None], outputs[-1].finish_reason

    return asyncio.run(main())


def _hf(model_dir: Path, prompt_ids: list[int], **kwargs) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt_ids) :].tolist()


def test_stop_token_ids_end_the_request_with_the_token_kept(engine: Engine, tiny_gpt2_dir: Path):
    free, _ = _run(engine, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = free[3]
    tokens, reason = _run(engine, SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop,)))
    assert reason == "stop" and tokens == free[: free.index(stop) + 1]


def test_min_tokens_masks_stop_tokens_as_hf_min_new_tokens(engine: Engine, tiny_gpt2_dir: Path):
    free, _ = _run(engine, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = free[0]  # would end the request at once
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop,), min_tokens=5)
    tokens, _ = _run(engine, params)
    assert stop not in tokens[:4] and len(tokens) >= 5
    expected = _hf(
        tiny_gpt2_dir, engine.tokenize(PROMPT), max_new_tokens=12, min_new_tokens=5, eos_token_id=[stop]
    )
    assert tokens == expected


def test_min_tokens_is_refused_with_beams_and_over_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=8, min_tokens=2, num_beams=2)


def test_whole_responses_equal_streams_with_the_extensions(engine: Engine):
    """A whole response (read once at its end, detokenised once) equals a streamed read with stop_token_ids
    (the kept stop token in its ids and text), min_tokens holding off a stop string and a stop token id, and
    include_stop_str_in_output."""
    free, _ = _run(engine, SamplingParams(max_new_tokens=16, ignore_eos=True))
    text = engine._detokenizer.decode(free)
    stop_text = text[len(text) // 3 : len(text) // 3 + 2]
    cases = [
        SamplingParams(max_new_tokens=16, ignore_eos=True, stop_token_ids=(free[4],)),
        SamplingParams(max_new_tokens=16, ignore_eos=True, stop_token_ids=(free[0],), min_tokens=3),
        SamplingParams(
            max_new_tokens=16, ignore_eos=True, stop=(stop_text,), include_stop_str_in_output=True
        ),
        SamplingParams(max_new_tokens=16, ignore_eos=True, stop=(stop_text,), min_tokens=12),
    ]

    async def read(params: SamplingParams, each_token: bool) -> tuple[list[int], str, str | None]:
        request = engine.add(engine.tokenize(PROMPT), params, each_token=each_token)
        outputs = [o async for o in engine.stream(request)]
        ids = [t for o in outputs for t in (o.token_ids or ([o.token_id] if o.token_id is not None else []))]
        return ids, "".join(o.text for o in outputs), outputs[-1].finish_reason

    async def main() -> None:
        for params in cases:
            whole = await read(params, each_token=False)
            assert whole == await read(params, each_token=True), params
            assert whole[2] == "stop" or len(whole[0]) == 16
        ids, whole_text, _ = await read(cases[0], each_token=False)
        assert ids == free[: free.index(free[4]) + 1] and whole_text == engine._detokenizer.decode(ids)

    asyncio.run(main())
