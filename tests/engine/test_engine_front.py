"""The async front: outputs are never lost, aborts end streams and free slots."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams


def test_request_finished_before_it_is_read_keeps_its_output(tiny_gpt2_dir: Path):
    """Regression: a one-token request could finish before stream() looked it up and lose everything."""
    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig())
    engine.start()

    async def main() -> list[list[int]]:
        requests = [engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=1)) for _ in range(8)]
        await asyncio.sleep(0.5)  # let them all finish first
        return [[o.token_id async for o in engine.stream(r) if o.token_id is not None] for r in requests]

    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    assert all(len(ids) == 1 for ids in results), results
    assert engine._streams == {}


def test_abort_ends_the_stream_and_frees_the_slot(tiny_gpt2_dir: Path):
    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig(max_num_seqs=1))
    engine.start()

    async def main() -> tuple[str | None, list[int]]:
        long = engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=100, ignore_eos=True))
        reasons = []
        received: list[int] = []

        async def consume() -> None:
            async for output in engine.stream(long):
                if output.token_id is not None:
                    received.append(output.token_id)
                    if len(received) == 1:  # running for sure, and far from its 100 tokens: abort now
                        engine.abort(long.request_id)
                if output.is_finished:
                    reasons.append(output.finish_reason)

        await asyncio.wait_for(consume(), 30)
        # aborted mid-way: the loop thread may have produced a few more tokens before it saw the abort
        assert 1 <= len(received) < 100, len(received)
        short = engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=3, ignore_eos=True))
        ids = [o.token_id async for o in engine.stream(short) if o.token_id is not None]
        for _ in range(3000):  # the finished request leaves its slot at the next engine step (ceiling 30 s)
            if engine.num_running == 0 and not engine.runner.slots:
                break
            await asyncio.sleep(0.01)
        return reasons[0], ids

    try:
        reason, ids = asyncio.run(main())
    finally:
        engine.stop()
    assert reason == "abort" and len(ids) == 3
    assert engine.num_running == 0 and not engine.runner.slots


def test_queue_limit_counts_only_requests_behind_busy_slots(tiny_gpt2_dir: Path):
    """Regression: with one slot and one queue place, a two-prompt completion could get 429 at random when
    its second prompt was added before the first had been admitted to the free slot."""
    from server.engine.engine import QueueFull

    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig(max_num_seqs=1, max_queue=1))

    async def main() -> None:  # the loop is not started: nothing is admitted between the adds
        params = SamplingParams(max_new_tokens=2)
        engine.add([1, 2], params)  # will take the free slot
        engine.add([1, 2], params)  # the one queue place
        with pytest.raises(QueueFull):
            engine.add([1, 2], params)

    asyncio.run(main())
