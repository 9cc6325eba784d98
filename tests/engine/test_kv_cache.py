"""KV budget planning and the generation_config settings the server warns about. No model needed."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from prefix_store.format import BackboneShape
from server.engine.backbone import unapplied_generation_settings
from server.engine.kv_cache import KVBudgetError, KVCache, default_kv_budget, plan_kv_cache

GPT2_LARGE = BackboneShape("gpt2", num_layers=36, num_heads=20, head_dim=64)


def test_bytes_per_slot_counts_keys_values_of_every_layer_and_position():
    per_seq = KVCache.bytes_per_slot(GPT2_LARGE, 1024, 0, torch.float32)
    assert per_seq == 36 * 2 * 20 * 64 * 4 * 1024  # 360 MiB: 64 of them are the 24 GB of the issue
    assert KVCache.bytes_per_slot(GPT2_LARGE, 1024, 512, torch.bfloat16) == per_seq // 2 * 3 // 2


def test_budget_caps_max_num_seqs_and_describes_it():
    per_seq = KVCache.bytes_per_slot(GPT2_LARGE, 1024, 0, torch.float32)
    plan = plan_kv_cache(per_seq, 1024, 64, default_kv_budget(24 * 2**30 - 3 * 2**30, 2**30))
    assert plan.num_seqs == plan.num_fit < 64
    assert f"capped to {plan.num_seqs}" in plan.describe(64)
    assert plan_kv_cache(per_seq, 1024, 4, 10 * per_seq).num_seqs == 4  # room to spare: as asked
    assert plan_kv_cache(per_seq, 1024, 4, None).num_seqs == 4  # no budget: as asked


def test_a_budget_below_one_sequence_is_refused_with_what_to_change():
    with pytest.raises(KVBudgetError, match="--kv-cache-bytes .* to at least .*--max-model-len"):
        plan_kv_cache(1000, 1024, 64, 999)


def test_unapplied_generation_settings_are_found():
    bart_cnn = GenerationConfig(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, min_length=56,
                                forced_bos_token_id=0, max_length=142)  # fmt: skip
    assert unapplied_generation_settings(bart_cnn) == {
        "num_beams": 4,
        "no_repeat_ngram_size": 3,
        "length_penalty": 2.0,
        "min_length": 56,
    }
    assert unapplied_generation_settings(GenerationConfig(num_beams=1, repetition_penalty=1.0)) == {}
