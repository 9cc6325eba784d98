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
            if engine.num_running == 0 and not engine.runner.batch.num_slots:
                break
            await asyncio.sleep(0.01)
        return reasons[0], ids

    try:
        reason, ids = asyncio.run(main())
    finally:
        engine.stop()
    assert reason == "abort" and len(ids) == 3
    assert engine.num_running == 0 and not engine.runner.batch.num_slots


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


def test_a_whole_response_is_handed_over_once_and_equals_the_stream(tiny_gpt2_dir: Path):
    """each_token=False (a whole response): the same tokens, text and finish as a streamed read of the same
    request, with a stop string too, and the consumer is woken once, when the request is done; without stop
    strings it is one output carrying every token id (detokenised once), with them one output per token."""
    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig())
    engine.start()
    params = [
        SamplingParams(max_new_tokens=24, ignore_eos=True),
        SamplingParams(max_new_tokens=24, temperature=0.9, seed=5, ignore_eos=True),
    ]

    async def read(each_token: bool, p: SamplingParams) -> tuple[list[tuple], int]:
        """The outputs, and how many times the reader was handed some (each wake-up hands over all waiting)."""
        request = engine.add(engine.tokenize("hello world"), p, each_token=each_token)
        batches = [batch async for batch in engine.stream_batches(request)]
        return [output for batch in batches for output in batch], len(batches)

    def whole_of(outputs: list) -> tuple:
        """(token ids, text, finish reason) of a read."""
        ids = [t for o in outputs for t in (o.token_ids or ([o.token_id] if o.token_id is not None else []))]
        return ids, "".join(o.text for o in outputs), outputs[-1].finish_reason

    async def main() -> int:
        stops = 0
        for p in params:
            streamed, streamed_wakes = await read(True, p)
            whole, whole_wakes = await read(False, p)
            assert whole_of(whole) == whole_of(streamed) and len(streamed) >= 24
            assert len(whole) == 1 and len(whole[0].token_ids) == 24
            assert whole_wakes == 1 and streamed_wakes > 10
            text = whole_of(streamed)[1]
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            if stop.strip():
                stopped = SamplingParams(**{**p.__dict__, "stop": (stop,)})
                streamed, _ = await read(True, stopped)
                whole, whole_wakes = await read(False, stopped)
                assert whole_of(whole) == whole_of(streamed) and whole[-1].finish_reason == "stop"
                assert [o.token_id for o in whole] == [o.token_id for o in streamed] and whole_wakes == 1
                stops += 1
        return stops

    try:
        assert asyncio.run(main()) >= 1  # a stop string was tried
    finally:
        engine.stop()
    assert engine._streams == {}


def test_steps_delivered_while_the_loop_is_behind_share_one_wake_up(tiny_gpt2_dir: Path, monkeypatch):
    """Outputs of steps delivered before the event loop ran the previous hand-over join it: one wake-up (a
    self-pipe write, which also costs the engine thread the GIL) for them all, and every output in order."""
    engine = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig())
    loop = asyncio.new_event_loop()
    wakes = []
    original = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: (wakes.append(a), original(*a))[1])

    async def add() -> object:
        return engine.add(engine.tokenize("hello"), SamplingParams(max_new_tokens=5, ignore_eos=True))

    request = loop.run_until_complete(add())
    for _ in range(5):  # five steps, the loop not running in between
        engine._deliver_all([engine.step()])
    assert len(wakes) == 1 and request.finish_reason == "length"
    ids = request.output_token_ids

    async def read() -> list[int]:
        return [o.token_id async for o in engine.stream(request)]

    assert loop.run_until_complete(read()) == ids
    loop.close()
