"""The native file, PEFT import (BART slot quirk included) and validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from prefix_store.format import (
    BackboneShape,
    Prefix,
    PrefixFormatError,
    import_peft,
    load_prefix,
    save_prefix,
    validate,
)

GPT2 = BackboneShape("gpt2", num_layers=3, num_heads=2, head_dim=4)
BART = BackboneShape("bart", num_layers=3, num_heads=2, head_dim=4)


def native(shape: BackboneShape, targets=("decoder",), num_tokens: int = 5, dtype=torch.float32) -> Prefix:
    tensors = {
        t: torch.randn(shape.num_layers, 2, shape.num_heads, num_tokens, shape.head_dim).to(dtype)
        for t in targets
    }
    return Prefix(model_type=shape.model_type, targets=tensors, prompt_template=" {source} <|endoftext|>")


def peft_files(
    task: str, num_tokens: int, layers: int, dim: int, heads: int
) -> tuple[bytes, bytes, torch.Tensor]:
    embeddings = torch.randn(num_tokens, 2 * layers * dim)
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task,
        "num_virtual_tokens": num_tokens,
        "num_layers": layers,
        "token_dim": dim,
        "num_attention_heads": heads,
    }
    return json.dumps(config).encode(), save({"prompt_embeddings": embeddings}), embeddings


def test_native_roundtrip_keeps_tensors_and_template():
    prefix = native(BART, ("encoder", "decoder", "cross"))
    loaded = load_prefix(save_prefix(prefix))
    assert loaded.target_names() == ["encoder", "decoder", "cross"]
    assert loaded.prompt_template == prefix.prompt_template
    for name in prefix.targets:
        assert torch.equal(loaded.targets[name], prefix.targets[name])
    validate(loaded, BART)


def test_peft_causal_layout_key_2l_value_2l_plus_1():
    config, weights, emb = peft_files("CAUSAL_LM", 4, 3, 8, 2)
    prefix = import_peft(config, weights)
    slots = emb.view(4, 6, 2, 4).permute(1, 2, 0, 3)  # [2L, H, P, d]
    decoder = prefix.targets["decoder"]
    assert decoder.shape == (3, 2, 2, 4, 4)
    for layer in range(3):
        assert torch.equal(decoder[layer, 0], slots[2 * layer])
        assert torch.equal(decoder[layer, 1], slots[2 * layer + 1])
    validate(prefix, GPT2)


def test_peft_seq2seq_quirk_slots_4l_mod_2l():
    config, weights, emb = peft_files("SEQ_2_SEQ_LM", 4, 3, 8, 2)
    prefix = import_peft(config, weights)
    slots = emb.view(4, 6, 2, 4).permute(1, 2, 0, 3)
    decoder = prefix.targets["decoder"]
    for layer in range(3):
        assert torch.equal(decoder[layer, 0], slots[(4 * layer) % 6])
        assert torch.equal(decoder[layer, 1], slots[(4 * layer + 1) % 6])
    assert prefix.target_names() == ["decoder"]


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "invalid_safetensors"),
        (b"\x00" * 3, "invalid_safetensors"),
        (b"\xff" * 64, "invalid_safetensors"),
        (save({"decoder": torch.zeros(1)}), "not_a_prefix_file"),
    ],
)
def test_garbage_is_refused_with_a_code(data: bytes, code: str):
    with pytest.raises(PrefixFormatError) as err:
        load_prefix(data)
    assert err.value.code == code


def test_truncated_file_is_refused():
    data = save_prefix(native(GPT2))
    with pytest.raises(PrefixFormatError):
        load_prefix(data[: len(data) // 2])


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda p: p.targets["decoder"].__setitem__((0, 0, 0, 0, 0), float("nan")), "non_finite_values"),
        (lambda p: p.targets["decoder"].__setitem__((0, 0, 0, 0, 0), float("inf")), "non_finite_values"),
        (lambda p: p.targets.__setitem__("decoder", p.targets["decoder"][:2]), "shape_mismatch"),
        (lambda p: p.targets.__setitem__("decoder", p.targets["decoder"].to(torch.int32)), "wrong_dtype"),
        (lambda p: p.targets.__setitem__("encoder", p.targets["decoder"]), "bad_targets"),
        (lambda p: setattr(p, "prompt_template", "no placeholder"), "bad_prompt_template"),
    ],
)
def test_validation_says_what_is_wrong(mutate, code):
    prefix = native(GPT2)
    mutate(prefix)
    with pytest.raises(PrefixFormatError) as err:
        validate(prefix, GPT2)
    assert err.value.code == code and err.value.message


def test_prefix_length_limit_and_model_type():
    with pytest.raises(PrefixFormatError) as err:
        validate(native(GPT2, num_tokens=9), GPT2, max_virtual_tokens=8)
    assert err.value.code == "prefix_too_long"
    with pytest.raises(PrefixFormatError) as err:
        validate(native(BART), GPT2)
    assert err.value.code == "wrong_model_type"


def test_peft_config_mismatch_and_other_methods():
    config, weights, _ = peft_files("CAUSAL_LM", 4, 2, 8, 2)
    with pytest.raises(PrefixFormatError) as err:
        validate(import_peft(config, weights), GPT2)  # 2 layers vs 3
    assert err.value.code == "shape_mismatch"
    lora = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}).encode()
    with pytest.raises(PrefixFormatError) as err:
        import_peft(lora, weights)
    assert err.value.code == "unsupported_adapter"
    bad_shape = json.loads(config)
    bad_shape["num_virtual_tokens"] = 5
    with pytest.raises(PrefixFormatError) as err:
        import_peft(json.dumps(bad_shape).encode(), weights)
    assert err.value.code == "shape_mismatch"
    with pytest.raises(PrefixFormatError):
        import_peft(b"{not json", weights)


def test_saving_is_deterministic_so_sha256_is_stable():
    prefix = native(BART, ("encoder", "decoder", "cross"), dtype=torch.bfloat16)
    prefix.extra_metadata = {"x-a": "1", "x-b": "2", "x-c": "3"}
    first = save_prefix(prefix)
    assert all(save_prefix(prefix) == first for _ in range(5))
    loaded = load_prefix(first)
    assert loaded.targets["cross"].dtype == torch.bfloat16
    assert torch.equal(loaded.targets["cross"], prefix.targets["cross"])
