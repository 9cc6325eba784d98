"""On CUDA (skipped without one): mixed-prefix batches equal PEFT's own generate on the same device."""

from __future__ import annotations

import pytest
import torch
from peft_oracle import MAX_NEW, PROMPTS, assert_prefixes_matter, peft_generate
from test_engine_exactness import peft_device_prefixes, run_engine

from server.engine.backbone import load_backbone
from server.engine.request import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_mixed_batches_match_peft_on_cuda(peft_case):
    kind, model_dir, adapters, _ = peft_case
    backbone = load_backbone(model_dir, "cuda", "float32")
    jobs, expected = [], []
    oracle = {None: peft_generate(model_dir, kind, None, PROMPTS, MAX_NEW, device="cuda")}
    prefixes = peft_device_prefixes(adapters, "cuda")
    for prefix_id, path in adapters.items():
        prefix = prefixes[prefix_id]
        want = oracle[prefix_id] = peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW, device="cuda")
        for prompt, ids in zip(PROMPTS, want, strict=True):
            jobs.append((prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW)))
            expected.append(ids)
    assert_prefixes_matter(oracle)
    results, distinct = run_engine(backbone, jobs, max_num_seqs=16)
    assert results == expected
    assert max(distinct) >= 3
