"""--retain-host-memory: glibc keeps freed blocks for the next step, so a step's tensors do not page-fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.host_memory import environment_sets_malloc

ROOT = Path(__file__).resolve().parents[2]

# A sampling step's allocations: top-p over [64, 8000] scores (nucleus_weights makes ~20 full-vocabulary
# temporaries, 0.5-4 MB each, alive at different times); the minor page faults of the repeats after a warm-up.
_STEPS = """
import json, resource, sys, torch
from server.engine.sampler import nucleus_weights, scaled_scores
from server.host_memory import retain_freed_memory
torch.set_num_threads(1)
line = retain_freed_memory({}) if sys.argv[1] == "retain" else "defaults"
scores = scaled_scores(torch.randn(64, 8000, generator=torch.Generator().manual_seed(0)), torch.ones(64))
top_p = torch.full((64,), 0.9)
def step():
    return float(nucleus_weights(scores, top_p)[0].sum())
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"line": line, "faults_per_step": faults / 10}))
"""


def _faults_per_step(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_serves_each_step_without_page_faults():
    defaults = _faults_per_step("defaults")
    retained = _faults_per_step("retain")
    assert retained["line"].startswith("host memory: freed blocks kept for reuse"), retained
    # glibc's defaults unmap or trim what the step freed, so the next step faults its pages in again (4 KiB
    # each: ~4,500 a step here) ...
    assert defaults["faults_per_step"] > 1000, defaults
    # ... retained, the same blocks come back from the heap already mapped
    assert retained["faults_per_step"] < defaults["faults_per_step"] / 20, (defaults, retained)


def test_an_operators_malloc_settings_win():
    assert environment_sets_malloc({"MALLOC_ARENA_MAX": "2"})
    assert environment_sets_malloc({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert environment_sets_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not environment_sets_malloc({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
    assert not environment_sets_malloc({"PATH": "/usr/bin", "MY_MALLOC_": "x"})
    from server.host_memory import retain_freed_memory

    line = retain_freed_memory({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "left to the environment" in line
