"""A tenant with nothing running gets a row at once: the tenant furthest over its share loses its latest
request (preempted, resumed later by recomputing its prompt and tokens), and every answer is still PEFT's.

The engine is stepped by hand so that the light tenant's requests arrive while a flood holds every row; the
flood carries a hostile tenant's NaN/Inf prefixes in the same steps.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
from peft_oracle import MAX_NEW, PROMPTS
from test_engine_exactness import device_prefix, peft_device_prefixes, run_engine
from test_fault_isolation import poisoned
from test_overlap import LaggedRunner
from test_paged_runner_process import paged_process_engine
from test_runner_process import process_engine

from server.engine.backbone import load_backbone
from server.engine.engine import Engine, EngineConfig
from server.engine.request import Request, RequestStatus, SamplingParams

LAYOUTS = {"slots": {}, "paged": {"kv_layout": "paged", "kv_block_size": 4}}


async def flood_and_light(engine: Engine, flood: list, light: list) -> tuple[list[Request], list[Request]]:
    """The flood's jobs queued at once (tenant "flood"); the light tenant's one after another, each two steps
    after the one before finished (a client's think time: the flood takes the row it left), so that every one
    arrives while the flood holds every row."""
    step = engine.overlapped_step if engine.overlaps else engine.step  # overlapped: one step in flight
    flooded = [
        engine.add(engine.tokenize(prompt), params, prefix, prefix.id if prefix else None, tenant="flood")
        for prefix, prompt, params in flood
    ]
    step()
    lights: list[Request] = []
    idle = 0
    for _ in range(2000):
        idle = idle + 1 if lights and lights[-1].is_finished else 0
        if not lights or idle > 2:
            if len(lights) == len(light):
                break
            prefix, prompt, params = light[len(lights)]
            lights.append(
                engine.add(
                    engine.tokenize(prompt), params, prefix, prefix.id if prefix else None, tenant="light"
                )
            )
            step()
            load = engine.scheduler.tenant_load()
            assert lights[-1].status is not RequestStatus.WAITING, (
                f"the light request waited for a row: {load}"
            )
            continue
        step()
    assert len(lights) == len(light) and engine.scheduler.load["flood"].num_waiting, "the flood ran dry"
    while engine.scheduler.has_work():
        step()
    if engine.overlaps:
        engine._drain()
    return flooded, lights


@pytest.mark.parametrize(
    ("peft_case", "layout"), [("gpt2", "slots"), ("gpt2", "paged"), ("bart", "paged")], indirect=["peft_case"]
)
def test_a_light_tenant_is_served_at_once_and_every_answer_is_still_peft(peft_case, layout):
    """BART resumes by encoding its source again (paged only: its slot layout does not preempt)."""
    kind, model_dir, adapters, expected = peft_case
    backbone = load_backbone(model_dir, "cpu", "float32")
    prefixes = peft_device_prefixes(adapters)
    ids = sorted(prefixes)
    hostile = [device_prefix(f"evil/{v}", poisoned(backbone, v)) for v in (float("nan"), float("inf"))]
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    flood, flood_keys = [], []
    for i, prompt in [*enumerate(PROMPTS)] * 4:
        for prefix_id in [None, *ids[:2]]:
            flood.append((prefixes.get(prefix_id), prompt, greedy))
            flood_keys.append((prefix_id, i))
        flood.append((hostile[i % 2], prompt, greedy))
        flood_keys.append(("evil", i))
    light_keys = [(prefix_id, i) for i in range(len(PROMPTS)) for prefix_id in ids[2:]]
    light = [(prefixes[p], PROMPTS[i], greedy) for p, i in light_keys]
    engine = Engine(backbone, EngineConfig(max_num_seqs=4, max_model_len=64, **LAYOUTS[layout]))
    flooded, lights = asyncio.run(flood_and_light(engine, flood, light))
    for (prefix_id, i), request in zip(flood_keys + light_keys, flooded + lights, strict=True):
        if prefix_id == "evil":
            assert request.finish_reason == "error" and request.output_token_ids == []
        else:
            assert request.output_token_ids == expected[prefix_id][i], (prefix_id, i)
    assert engine.scheduler.num_share_preemptions >= len(lights) // 2  # the flood held every row each time
    assert engine.scheduler.num_running == 0 and engine.scheduler.rows.requests.count(None) >= 4
    if layout == "paged":
        assert engine.runner.block_pool.num_sequence_blocks == 0


@pytest.mark.parametrize("peft_case", ["gpt2"], indirect=True)
@pytest.mark.parametrize("runner", ["overlapped", "process"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_preemption_for_share_with_steps_in_flight_and_in_the_runner_process(peft_case, runner, layout):
    """Overlapped steps (the victim's token of the step in flight is recorded after it was preempted) and the
    runner process (preempted and resumed rows cross the pipe; paged: their blocks, freed and granted again by
    the front's pool): every answer is still PEFT's."""
    kind, model_dir, adapters, expected = peft_case
    prefixes = peft_device_prefixes(adapters)
    ids = sorted(prefixes)
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    flood_keys = [(p, i) for i in range(len(PROMPTS)) for p in [None, *ids[:2]]] * 3
    light_keys = [(p, i) for i in range(len(PROMPTS)) for p in ids[2:]]
    flood = [(prefixes.get(p), PROMPTS[i], greedy) for p, i in flood_keys]
    light = [(prefixes[p], PROMPTS[i], greedy) for p, i in light_keys]
    if runner == "overlapped":
        backbone = load_backbone(model_dir, "cpu", "float32")
        config = EngineConfig(max_num_seqs=4, **LAYOUTS[layout])
        engine = Engine(backbone, config, runner=LaggedRunner(backbone, config))
    elif layout == "paged":
        engine = paged_process_engine(model_dir, overlap=True, max_num_seqs=4)
    else:
        engine = process_engine(model_dir, max_num_seqs=4)
    try:
        assert engine.scheduler.config.preempt_for_share
        flooded, lights = asyncio.run(flood_and_light(engine, flood, light))
    finally:
        if runner == "process":
            engine.runner.close()
    for (prefix_id, i), request in zip(flood_keys + light_keys, flooded + lights, strict=True):
        assert request.output_token_ids == expected[prefix_id][i], (prefix_id, i)
    assert engine.scheduler.num_share_preemptions >= len(lights) // 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_preempted_sampled_requests_draw_what_they_draw_alone(tiny_gpt2_dir: Path, layout):
    """Seeded sampling with penalties and min_tokens: the flood's preempted and resumed requests, and the light
    tenant's, draw what each draws alone."""
    backbone = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    params = functools.partial(
        SamplingParams, max_new_tokens=14, temperature=0.9, top_p=0.95, repetition_penalty=1.3, min_tokens=6
    )
    flood = [(None, PROMPTS[i % len(PROMPTS)], params(seed=i)) for i in range(16)]
    light = [(None, PROMPTS[i], params(seed=100 + i)) for i in range(3)]
    alone, _ = run_engine(backbone, flood + light, max_num_seqs=16, stagger=False)
    engine = Engine(backbone, EngineConfig(max_num_seqs=3, max_model_len=64, **LAYOUTS[layout]))
    flooded, lights = asyncio.run(flood_and_light(engine, flood, light))
    assert [r.output_token_ids for r in flooded + lights] == alone
    assert engine.scheduler.num_share_preemptions >= 2


def test_bart_slots_and_fifo_do_not_preempt(tiny_bart_dir: Path, tiny_gpt2_dir: Path):
    """BART's slot layout cannot resume a row by recomputing it, and the fifo policy has no shares: neither
    preempts (the light tenant waits for a turnover, as before)."""
    bart = Engine(load_backbone(tiny_bart_dir, "cpu", "float32"), EngineConfig(max_num_seqs=2))
    fifo = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig(max_num_seqs=2, policy="fifo"))
    assert not bart.scheduler.config.preempt_for_share and not fifo.scheduler.config.preempt_for_share
    gpt2 = Engine(load_backbone(tiny_gpt2_dir, "cpu", "float32"), EngineConfig(max_num_seqs=2))
    assert gpt2.scheduler.config.preempt_for_share
