"""Every benchmark figure in the README comes from a committed result file (bench/results/*.json)."""

from __future__ import annotations

import json

from bench.record import RESULTS
from bench.report import README, readme_section, render


def test_readme_figures_are_rendered_from_the_committed_results() -> None:
    assert readme_section(README.read_text()) == render(), "run: .venv/bin/python -m bench.report --write"


def test_every_result_file_says_when_where_and_how() -> None:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "no committed benchmark results"
    for path in files:
        record = json.loads(path.read_text())
        assert record["benchmark"] == path.stem
        assert record["date"] and record["command"].startswith(".venv/bin/python -m bench.")
        assert record["machine"]["cpu_count"] and record["machine"]["torch"]
        assert record["figures"]
