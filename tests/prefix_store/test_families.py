"""The family registry: one spec per backbone family, read by server, trainer and demo; no import cycles."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

from prefix_store.families import BackboneError, families, family, generation_rules, register
from prefix_store.families.spec import FamilySpec, GenerationRules
from prefix_store.format import BackboneShape

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_in_the_package_is_a_registered_family():
    modules = {p.stem for p in (ROOT / "prefix_store" / "families").glob("*.py")} - {"__init__", "spec"}
    # llama.py registers three model types (llama, qwen2, mistral): one module, one layer shape
    assert {spec.server_backbone.split(":")[0].rsplit(".", 1)[1] for spec in families().values()} == modules
    assert set(families()) == {"gpt2", "bart", "llama", "qwen2", "mistral"}
    assert modules == {"gpt2", "bart", "llama"}


def test_unknown_model_type_names_the_supported_families():
    with pytest.raises(BackboneError, match="'gpt_neo' is not supported") as refused:
        family("gpt_neo")
    assert "GPT-2 family" in str(refused.value) and "BART family" in str(refused.value)
    assert "Llama family" in str(refused.value) and "Qwen2 family" in str(refused.value)


def test_a_registered_family_is_found():
    spec = FamilySpec("toy", "Toy", False, ("decoder",), "x:Y", "x:Y", "x:Y",
                      shape=lambda c: BackboneShape("toy", 1, 8, 4, num_kv_heads=2), max_positions=lambda c: 64)  # fmt: skip
    register(spec)
    try:
        assert family("toy").shape(None).kv_heads == 2
    finally:
        from prefix_store.families.spec import _REGISTRY

        _REGISTRY.pop("toy")


def test_fit_rules_per_topology():
    gpt2, bart = family("gpt2"), family("bart")
    assert gpt2.fit_error(10, 100, 18, 128) is None
    assert "prefix + prompt + max_new_tokens = 129" in gpt2.fit_error(10, 100, 19, 128)
    assert bart.fit_error(10, 128, 118, 128) is None  # the encoder is not shifted by the prefix
    assert "encodes at most 128" in bart.fit_error(0, 129, 1, 128)
    assert "prefix + max_new_tokens = 129" in bart.fit_error(10, 5, 119, 128)


def test_forced_tokens_where_hf_forces_them():
    rules = GenerationRules(frozenset({2}), 0, 1, 2, forced_bos_token_id=0, forced_eos_token_id=2)
    bart, gpt2 = family("bart"), family("gpt2")
    assert bart.forced_token(rules, 7, 0, 10) == 0  # first decoder token
    assert bart.forced_token(rules, 7, 1, 10) is None
    assert bart.forced_token(rules, 7, 9, 10) == 2  # the last the budget allows
    assert bart.forced_token(rules, 7, 9, 10, ignore_eos=True) is None
    assert gpt2.forced_token(rules, 7, 0, 10) is None  # cur_len counts the prompt: never 1


def test_no_import_cycles_between_project_modules():
    modules = {}
    for package in ("server", "prefix_store", "trainer"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_server_and_trainer_stop_on_every_eos_id(tiny_gpt2_dir: Path, tmp_path: Path):
    """generation_config.eos_token_id may be a list: both stop at any of its ids (they used to disagree)."""
    import asyncio

    from server.engine.backbone import load_backbone as load_served
    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import SamplingParams
    from trainer.backbone import load_backbone as load_trained
    from trainer.decode import greedy

    trained = load_trained(tiny_gpt2_dir)
    prompt = trained.tokenizer("the coffee shop")["input_ids"]
    free = greedy(trained, None, prompt, 8)
    assert len(free) == 8
    stop_at = next(k for k in range(1, 8) if free[k] not in free[:k])  # a token first generated at k
    model_dir = tmp_path / "two-eos"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [trained.tokenizer.eos_token_id, free[stop_at]]
    config_path.write_text(json.dumps(config))

    served = load_served(model_dir, "cpu", "float32")
    assert served.rules == generation_rules(load_trained(model_dir).model.generation_config, served.tokenizer)
    assert greedy(load_trained(model_dir), None, prompt, 8) == free[:stop_at]
    engine = Engine(served, EngineConfig(max_num_seqs=2))

    async def run() -> list[int]:
        request = engine.add(prompt, SamplingParams(max_new_tokens=8), None, None)
        return [o.token_id async for o in engine.stream(request) if o.token_id is not None]

    engine.start()
    try:
        assert asyncio.run(run()) == free[:stop_at]
    finally:
        engine.stop()
    assert sys.modules["prefix_store.families.gpt2"].GPT2 is family("gpt2")
