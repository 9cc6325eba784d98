"""--torch-threads: the forward's intra-op threads leave a core to the HTTP front unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import settings_from_args
from server.host_threads import forward_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_leaves_one_cpu_to_the_front():
    assert forward_threads(None, {}, 16) == (15, "16 CPUs, one left to the HTTP front")
    assert forward_threads(None, {}, 2)[0] == 1
    assert forward_threads(None, {}, 1)[0] == 1  # never zero


def test_omp_num_threads_is_kept_and_the_flag_wins_over_it():
    assert forward_threads(None, {"OMP_NUM_THREADS": "3"}, 16) == (3, "OMP_NUM_THREADS")
    assert forward_threads(None, {"OMP_NUM_THREADS": " "}, 16)[0] == 15  # blank: not set
    assert forward_threads(None, {"OMP_NUM_THREADS": "zero"}, 16)[0] == 15  # not a count: the default
    assert forward_threads(4, {"OMP_NUM_THREADS": "3"}, 16) == (4, "--torch-threads")


def test_the_flag_is_a_positive_count():
    assert settings_from_args(["--torch-threads", "2"]).torch_threads == 2
    assert settings_from_args([]).torch_threads is None
    with pytest.raises(ValueError, match="torch_threads"):
        settings_from_args(["--torch-threads", "0"])


def test_set_forward_threads_sets_torch_in_a_fresh_process():
    code = (
        "import os, torch; from server.host_threads import set_forward_threads; "
        "line = set_forward_threads(None, os.environ); print(torch.get_num_threads(), line)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    want = max(1, usable_cpus() - 1)
    assert out.stdout.split()[0] == str(want) and "one left to the HTTP front" in out.stdout, out.stdout
