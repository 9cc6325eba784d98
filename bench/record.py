"""Benchmark results as committed JSON files: the figures, with when, where and how they were measured.

Every benchmark writes `bench/results/<name>.json` through `write_result`; `python -m bench.report` renders
bench/README.md's figures from those files, so every number there has a file (and a command) behind it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):  # 1/5/15-minute load when written: other jobs sharing the machine
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def command(module: str) -> str:
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def spread(samples: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements (what bench/README.md quotes), and the samples themselves."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def write_result(name: str, module: str, figures: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command(module),
        "figures": figures,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
