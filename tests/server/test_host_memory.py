"""--retain-host-memory: glibc keeps freed blocks for the next step, so a step's tensors do not page-fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.host_memory import environment_sets_malloc, retain_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# A sampling step's allocations: top-p over [64, 8000] scores (nucleus_weights makes ~20 full-vocabulary
# temporaries, 0.5-4 MB each, alive at different times). Prints the minor page faults per step of the repeats
# after a warm-up, before and after `argv[1]`: "set" (set_thresholds) or "retain" (retain_freed_memory, as
# prefix-serve calls it).
_STEPS = """
import json, os, resource, sys, torch
from server.engine.sampler import nucleus_weights, scaled_scores
from server.host_memory import retain_freed_memory, set_thresholds
torch.set_num_threads(1)
scores = scaled_scores(torch.randn(64, 8000, generator=torch.Generator().manual_seed(0)), torch.ones(64))
top_p = torch.full((64,), 0.9)
def faults_per_step():
    for _ in range(3):
        nucleus_weights(scores, top_p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        nucleus_weights(scores, top_p)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
first = faults_per_step()
line = set_thresholds() if sys.argv[1] == "set" else retain_freed_memory(os.environ)
print(json.dumps({"before": first, "after": faults_per_step(), "line": line}))
"""


def _run(mode: str, env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], cwd=ROOT, env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fixed_thresholds_serve_each_step_without_page_faults():
    # glibc's thresholds move with what was freed before, so whether its defaults fault varies from run to run
    # (150 to 4,500 a step here); a fixed 128 KiB mmap threshold (glibc's starting value) makes every block of
    # the step a fresh mapping, faulted in page by page (4 KiB each) ...
    unkept = _run("set", {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert unkept["before"] > 1000, unkept
    # ... and set_thresholds, in the same process, has the same blocks come back from the heap already mapped
    assert unkept["line"] is None and unkept["after"] < unkept["before"] / 20, unkept


def test_the_server_call_keeps_blocks_in_a_clean_environment():
    retained = _run("retain", {})
    assert retained["line"].startswith("host memory: freed blocks kept for reuse"), retained
    # of the ~10,000 pages the step's temporaries span (0 to 150 here: blocks freed earlier in glibc's own mode
    # may leave the heap fragmented for a while)
    assert retained["after"] < 1000, retained


def test_an_operators_malloc_settings_win():
    assert environment_sets_malloc({"MALLOC_ARENA_MAX": "2"})
    assert environment_sets_malloc({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert environment_sets_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not environment_sets_malloc({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
    assert not environment_sets_malloc({"PATH": "/usr/bin", "MY_MALLOC_": "x"})
    assert "left to the environment" in retain_freed_memory({"MALLOC_MMAP_THRESHOLD_": "131072"})
    # and in a process started with such settings, prefix-serve's call changes nothing
    kept_by_operator = _run("retain", {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "left to the environment" in kept_by_operator["line"]
    assert kept_by_operator["after"] > 1000, kept_by_operator
