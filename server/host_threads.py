"""The forward's intra-op threads on the host (`--torch-threads`): by default one core is left to the HTTP front.

torch starts one intra-op thread per core. In a server the forward is not alone on those cores: the front's
event loop (parsing, refusing, answering) and, on a small machine, clients and other processes run there too.
With every core taken by the forward, a step waits whenever one of its threads is descheduled, so a flood of
requests that the front answers slows every step for everyone. So the default takes the CPUs this process may
run on less one (at least one), the share vLLM's CPU backend also leaves to its serving front. OMP_NUM_THREADS,
when set, is the operator's choice and is kept; --torch-threads wins over both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a cgroup CPU quota is not seen here)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def forward_threads(setting: int | None, environ: Mapping[str, str], cpus: int) -> tuple[int, str]:
    """(threads, where the number comes from) for --torch-threads `setting`, the environment and `cpus`."""
    if setting is not None:
        return setting, "--torch-threads"
    from_env = environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    return max(1, cpus - 1), f"{cpus} CPUs, one left to the HTTP front"


def set_forward_threads(setting: int | None, environ: Mapping[str, str]) -> str:
    """Set torch's intra-op threads (before the model loads); returns the start-up log line."""
    threads, source = forward_threads(setting, environ, usable_cpus())
    torch.set_num_threads(threads)
    return f"forward threads: {threads} ({source})"
