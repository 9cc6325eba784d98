"""`prefix-train` on a tiny Llama: the loss falls, the prefix it writes is shaped per key/value head, and the
server's engine serves it with the trainer's own greedy tokens (PEFT's placement, the prompt template)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_trainer_training import EXAMPLES, FAST
from tiny_models import build_llama

from prefix_store.cache import DevicePrefix
from prefix_store.format import apply_template, load_prefix, save_prefix, validate
from prefix_store.store import make_meta
from server.engine.backbone import load_backbone as load_served
from server.engine.engine import Engine, EngineConfig
from server.engine.request import SamplingParams
from trainer.backbone import load_backbone
from trainer.cli import main
from trainer.decode import greedy
from trainer.llama import LlamaBackbone
from trainer.train import TrainConfig, train_prefix

SOURCES = [e.source for e in EXAMPLES[:3]] + ["the quick brown fox"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"), "llama")


def test_short_run_lowers_training_loss(tiny_llama_dir: Path) -> None:
    backbone = load_backbone(tiny_llama_dir)
    assert isinstance(backbone, LlamaBackbone)
    result = train_prefix(backbone, EXAMPLES, TrainConfig(max_steps=25, **{**FAST, "learning_rate": 3e-2}))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses


def test_targets_carry_no_bos_and_end_with_eos(tiny_llama_dir: Path) -> None:
    backbone = load_backbone(tiny_llama_dir)
    features = backbone.featurize(EXAMPLES[0], backbone.default_template())
    bos, eos = backbone.tokenizer.bos_token_id, backbone.eos_token_id
    assert features.source_ids[0] == bos and bos not in features.target_ids
    assert features.target_ids[-1] == eos


def serve(model_dir: Path, prefix_bytes: bytes, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The engine's greedy tokens for every prompt with the prefix, all submitted at once (batched)."""
    prefix = load_prefix(prefix_bytes)
    backbone = load_served(model_dir, "cpu", "float32")
    validate(prefix, backbone.shape)
    meta = make_meta("t/trained", prefix, prefix_bytes, "native", False)
    device_prefix = DevicePrefix(meta=meta, targets=prefix.targets, num_bytes=prefix.num_bytes)
    engine = Engine(backbone, EngineConfig(max_num_seqs=4))

    async def one(ids: list[int]) -> list[int]:
        request = engine.add(ids, SamplingParams(max_new_tokens=max_new), device_prefix, "t/trained")
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    async def everything() -> list[list[int]]:
        return await asyncio.gather(*(one(ids) for ids in prompts))

    engine.start()
    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def test_cli_writes_a_prefix_the_server_serves_as_the_trainer_decodes(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "pairs.txt"
    data.write_text("".join(f"{e.source}||{e.target}\n" for e in EXAMPLES[:3]))
    output = tmp_path / "llama.safetensors"
    code = main(["--model", str(tiny_llama_dir), "--train", str(data), "--output", str(output), "--max-steps", "6",
                 "--batch-size", "3", "--lr", "2e-2", "--mid-dim", "16", "--prefix-length", "4", "--quiet",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    prefix = load_prefix(output.read_bytes())
    assert prefix.model_type == "llama" and prefix.prompt_template == "{source}\n"
    assert tuple(prefix.targets["decoder"].shape) == (2, 2, 2, 4, 16)  # [L, 2, key/value heads, P, d]
    trainer = load_backbone(tiny_llama_dir)
    prompts = [trainer.prompt_ids(s, prefix.prompt_template) for s in SOURCES]
    assert prompts[0] == trainer.tokenizer(apply_template(prefix.prompt_template, SOURCES[0]))["input_ids"]
    expected = [greedy(trainer, prefix.targets, ids, 12) for ids in prompts]
    assert any(expected), "the trained prefix should generate something"
    assert expected != [greedy(trainer, None, ids, 12) for ids in prompts], "the prefix changes nothing"
    assert serve(tiny_llama_dir, output.read_bytes(), prompts, 12) == expected
    # and it serves the same saved again (the native file round-trips)
    assert serve(tiny_llama_dir, save_prefix(prefix), prompts[:1], 12) == expected[:1]
