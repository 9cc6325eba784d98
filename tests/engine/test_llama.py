"""The Llama family (Llama, Qwen2, Mistral): PEFT-exact serving in mixed batches, beams, padded decode steps,
rotary variants against HF, and prefixes of one family refused by another naming both shapes."""

from __future__ import annotations

from pathlib import Path

import peft_oracle
import pytest
import test_beam_search
import test_cuda_graphs
import test_fault_isolation
import test_runner_process
import torch
from peft_oracle import LENGTHS, MAX_NEW, PROMPTS, assert_prefixes_matter, make_peft_adapter, peft_generate
from test_engine_exactness import device_prefix, run_engine
from tiny_models import build_llama
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from prefix_store.families import family
from prefix_store.format import Prefix, PrefixFormatError, import_peft, validate
from server.engine.backbone import load_backbone
from server.engine.kv_cache import KVCache
from server.engine.llama import LlamaBackbone
from server.engine.request import SamplingParams

KINDS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def llama_case(request, tmp_path_factory: pytest.TempPathFactory):
    """PEFT adapters of lengths 3-12 on a tiny random backbone of `kind`, and PEFT's greedy output for each
    prompt (the same tuple as conftest's peft_case, so the GPT-2 tests run on this family unchanged)."""
    kind = request.param
    model_dir = build_llama(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)
    root = tmp_path_factory.mktemp(f"peft-{kind}")
    # scale 1.0: on these GQA models a 0.5-scaled 3-token prefix can leave a greedy answer unchanged
    adapters = {
        f"t/a{i}": make_peft_adapter(model_dir, kind, n, root / f"a{i}", seed=10 + i, scale=1.0)
        for i, n in enumerate(LENGTHS)
    }
    expected = {None: peft_generate(model_dir, kind, None, PROMPTS, MAX_NEW)}
    for prefix_id, path in adapters.items():
        expected[prefix_id] = peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW)
    return kind, model_dir, adapters, expected


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"), "llama")


def imported(kind: str, path: Path) -> Prefix:
    return import_peft(
        (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes(), kind
    )


def test_mixed_batches_match_peft_token_for_token(llama_case):
    kind, model_dir, adapters, expected = llama_case
    assert_prefixes_matter(expected)
    device = peft_oracle.DEVICE
    backbone = load_backbone(model_dir, device, "float32")
    assert isinstance(backbone, LlamaBackbone) and backbone.shape.kv_heads < backbone.shape.num_heads
    prefixes: dict = {None: None}
    for prefix_id, path in adapters.items():
        prefix = imported(kind, path)
        validate(prefix, backbone.shape)  # PEFT's GQA layout is this backbone's: [L, 2, Hkv, P, d]
        prefix.targets = {k: v.to(device) for k, v in prefix.targets.items()}
        prefixes[prefix_id] = device_prefix(prefix_id, prefix)
    jobs, keys = [], []
    for p_index in range(len(PROMPTS)):
        for prefix_id in prefixes:
            jobs.append((prefixes[prefix_id], PROMPTS[p_index], SamplingParams(max_new_tokens=MAX_NEW)))
            keys.append((prefix_id, p_index))
    results, distinct = run_engine(backbone, jobs)
    assert any(len(ids) > 2 for ids in results), "degenerate oracle: every generation is (almost) empty"
    mismatches = [
        (k, got, expected[k[0]][k[1]])
        for k, got in zip(keys, results, strict=True)
        if got != expected[k[0]][k[1]]
    ]
    assert not mismatches, mismatches
    assert max(distinct) >= 4, f"steps did not mix prefixes: {distinct}"


def test_padded_decode_steps_are_exact(llama_case):
    """The CUDA-graph buckets (pad rows, keys rounded up) on this family, eagerly on CPU."""
    test_cuda_graphs.test_padded_decode_is_exact_with_sequences_joining_and_leaving(llama_case)


def test_beam_search_matches_peft_generate_in_mixed_steps(llama_case):
    if llama_case[0] != "llama":
        pytest.skip("the beam path is family-agnostic: one family of this shape suffices")
    test_beam_search.test_beam_search_matches_peft_generate_in_mixed_steps(llama_case)


@pytest.mark.parametrize("padded", [False, True])
def test_poisoned_rows_fail_alone(llama_case, padded):
    if llama_case[0] != "qwen2":
        pytest.skip("fault isolation lives in the runner and sampler: one family of this shape suffices")
    test_fault_isolation.test_poisoned_rows_fail_alone_and_their_slots_are_clean_for_the_next(
        llama_case, padded
    )


def test_runner_process_gives_peft_tokens_samples_logprobs_and_beams(llama_case):
    if llama_case[0] != "mistral":
        pytest.skip("the runner process is family-agnostic: one family of this shape suffices")
    test_runner_process.test_runner_process_gives_peft_tokens_and_the_in_process_samples(llama_case)


def test_one_host_sync_per_decode_step(tiny_llama_dir: Path):
    """No device -> host wait in this family's forward (what a CUDA graph capture needs too)."""
    test_fault_isolation.test_one_host_sync_per_decode_step_whatever_the_mix(tiny_llama_dir)


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_llama_dir: Path):
    test_fault_isolation.test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_llama_dir)


def test_the_tokenizer_carries_a_chat_template_and_adds_bos(tiny_llama_dir: Path):
    """For /v1/chat/completions on this family: the served tokenizer renders chats with its own template."""
    tokenizer = load_backbone(tiny_llama_dir, "cpu", "float32").tokenizer
    chat = [{"role": "user", "content": "the quick brown fox"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe quick brown fox<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + i / 16 for i in range(4)],
        "long_factor": [2.0 + i / 8 for i in range(4)],
        "original_max_position_embeddings": 32,
    },
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_prefill_and_decode_logits_equal_hf_with_a_prefix_for_every_rope_type(rope: str):
    """HF's own forward fed as PEFT feeds it (prefix keys/values in the cache, position ids from P) against this
    backbone's prefill and decode steps, for every rope type HF initialises from a config."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, initializer_range=0.1, rope_scaling=ROPES[rope])  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    backbone = LlamaBackbone(model, None, None, name="tiny")  # type: ignore[arg-type]
    shape = backbone.shape
    prefix = torch.randn(shape.num_layers, 2, shape.kv_heads, 5, shape.head_dim)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cache = KVCache(shape, 2, backbone.max_positions, 0, "cpu", torch.float32)
    backbone.write_prefix(cache, 1, {"decoder": prefix})
    ours = [backbone.prefill(cache, 1, [prompt], [5])[0]]
    ours += [
        backbone.decode(cache, torch.tensor([0, 7]), torch.tensor([0, 13 + i]), 14 + i)[1] for i in range(3)
    ]
    hf_cache = DynamicCache()
    for layer, kv in enumerate(prefix):
        hf_cache.update(kv[0][None], kv[1][None], layer)
    ids = torch.tensor([prompt + [7, 7, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=5 + torch.arange(11)[None], past_key_values=hf_cache)
    want = out.logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(ours), want, rtol=1e-4, atol=1e-4)


def test_positions_are_capped_where_attention_would_stop_being_causal():
    mistral = AutoConfig.for_model("mistral", max_position_embeddings=128, sliding_window=64)
    assert family("mistral").max_positions(mistral) == 64
    mistral.sliding_window = None
    assert family("mistral").max_positions(mistral) == 128
    qwen2 = AutoConfig.for_model("qwen2", max_position_embeddings=128, num_hidden_layers=2,
                                 use_sliding_window=True, sliding_window=32, max_window_layers=2)  # fmt: skip
    assert family("qwen2").max_positions(qwen2) == 128  # no layer at or past max_window_layers: all full
    qwen2 = AutoConfig.for_model("qwen2", max_position_embeddings=128, num_hidden_layers=2,
                                 use_sliding_window=True, sliding_window=32, max_window_layers=1)  # fmt: skip
    assert family("qwen2").max_positions(qwen2) == 32
    longrope = AutoConfig.for_model("llama", max_position_embeddings=128, rope_scaling=ROPES["longrope"],
                                    hidden_size=32, num_attention_heads=4)  # fmt: skip
    assert family("llama").max_positions(longrope) == 32


def native(model_type: str, layers: int, heads: int, head_dim: int, length: int = 4) -> Prefix:
    return Prefix(model_type, {"decoder": torch.zeros(layers, 2, heads, length, head_dim)})


def test_a_prefix_of_one_family_is_refused_by_another_naming_both_shapes(tiny_gpt2_dir: Path, tmp_path: Path):
    gpt2 = load_backbone(tiny_gpt2_dir, "cpu", "float32")
    llama = load_backbone(build_llama(tmp_path / "llama", "llama"), "cpu", "float32")
    assert (llama.shape.num_layers, llama.shape.kv_heads, llama.shape.head_dim) == (2, 2, 16)
    for prefix, backbone, shapes in [
        (
            native("llama", 2, 2, 16),
            gpt2,
            ("llama backbone (decoder [2, 2, 2, 4, 16])", "[2, 2, 4, 'P', 16]"),
        ),
        (native("gpt2", 2, 4, 16), llama, ("gpt2 backbone (decoder [2, 2, 4, 4, 16])", "[2, 2, 2, 'P', 16]")),
        (native("qwen2", 2, 2, 16), llama, ("qwen2 backbone", "a llama backbone")),
    ]:
        with pytest.raises(PrefixFormatError) as refused:
            validate(prefix, backbone.shape)
        assert refused.value.code == "wrong_model_type"
        assert all(s in refused.value.message for s in shapes), refused.value.message
    # the right family with the query heads instead of the key/value heads: the shape names both
    with pytest.raises(
        PrefixFormatError, match=r"shaped \[2, 2, 4, 4, 16\]; this backbone needs \[2, 2, 2, 'P', 16\]"
    ):
        validate(native("llama", 2, 4, 16), llama.shape)
    validate(native("llama", 2, 2, 16), llama.shape)
