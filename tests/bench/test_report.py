"""Every benchmark figure in bench/README.md comes from a committed result file (bench/results/*.json)."""

from __future__ import annotations

import json

from bench.record import RESULTS
from bench.report import README, readme_section, render

# a bench module, or an outside load generator run against the server (its own report beside the json)
COMMANDS = (".venv/bin/python -m bench.", "HF_HUB_OFFLINE=1 .venv/bin/guidellm ")


def test_readme_figures_are_rendered_from_the_committed_results() -> None:
    assert readme_section(README.read_text()) == render(), "run: .venv/bin/python -m bench.report --write"


def test_every_result_file_says_when_where_and_how() -> None:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "no committed benchmark results"
    for path in files:
        record = json.loads(path.read_text())
        assert record["benchmark"] == path.stem
        assert record["date"] and record["command"].startswith(COMMANDS)
        assert record["machine"]["cpu_count"] and record["machine"]["torch"]
        assert record["figures"]


def test_sampling_table_shows_page_faults_when_recorded(monkeypatch) -> None:
    from bench import report

    record = json.loads((RESULTS / "sampling.json").read_text())
    for results in (record["figures"]["this"], record["figures"]["before"]["results"]):
        for i, figures in enumerate(results.values()):
            figures["faults_per_step"] = 1234.0 * i
    monkeypatch.setattr(report, "load", lambda name: record)
    lines = report.sampling()
    header = next(line for line in lines if line.startswith("| | tokens/s"))
    assert header.count("page faults/step") == 2
    top_p = next(line for line in lines if line.startswith("| top-p only"))
    assert top_p.count("| 3,702 |") == 2 and top_p.count("|") == header.count("|")
    assert "minor page faults per step" in lines[0]


def test_sampling_table_shows_engine_wait_and_a_dash_where_the_before_server_lacks_it(monkeypatch) -> None:
    from bench import report

    record = json.loads((RESULTS / "sampling.json").read_text())
    for figures in record["figures"]["this"].values():
        figures["wait_ms"] = 1.5
    for figures in record["figures"]["before"]["results"].values():
        figures["wait_ms"] = None  # a checkout from before prefixserve_engine_step_cpu_seconds
    monkeypatch.setattr(report, "load", lambda name: record)
    lines = report.sampling()
    header = next(line for line in lines if line.startswith("| | tokens/s"))
    assert header.count("engine wait ms/step") == 2
    for line in lines:
        if line.startswith("| greedy") or line.startswith("| sampled"):
            assert "| 1.5 |" in line and "| – |" in line and line.count("|") == header.count("|")
    assert "off the CPU" in lines[0]


def test_sampling_table_shows_the_paired_ratio_when_recorded(monkeypatch) -> None:
    from bench import report

    record = json.loads((RESULTS / "sampling.json").read_text())
    for results in (record["figures"]["this"], record["figures"]["before"]["results"]):
        for figures in results.values():
            figures["x_greedy_paired"] = {
                "median": 0.93,
                "min": 0.81,
                "max": 1.02,
                "samples": [0.81, 0.93, 1.02],
            }
    monkeypatch.setattr(report, "load", lambda name: record)
    lines = report.sampling()
    header = next(line for line in lines if line.startswith("| | tokens/s"))
    rule = lines[lines.index(header) + 1]
    assert header.count("paired: median (range)") == 2 and rule.count("|") == header.count("|")
    for line in lines:
        if line.startswith("| greedy") or line.startswith("| sampled"):
            # this server's paired median in bold (the figure to read), the before server's plain
            assert "| **0.93×** (0.81–1.02) |" in line and "| 0.93× (0.81–1.02) |" in line, line
            assert line.count("|") == header.count("|")
    assert "paired ratio" in lines[0]
    # a record from before the paired ratio: no such column, the best-of ratio in bold
    for results in (record["figures"]["this"], record["figures"]["before"]["results"]):
        for figures in results.values():
            del figures["x_greedy_paired"]
    lines = report.sampling()
    assert not any("paired" in line for line in lines)
    greedy = next(line for line in lines if line.startswith("| greedy"))
    assert "| **1.00×** |" in greedy


def test_sampling_table_names_the_runner_process_columns(monkeypatch) -> None:
    from bench import report

    record = json.loads((RESULTS / "sampling.json").read_text())
    record["figures"]["settings"]["runner_process"] = True
    monkeypatch.setattr(report, "load", lambda name: record)
    lines = report.sampling()
    header = next(line for line in lines if line.startswith("| | tokens/s"))
    assert "in one process (" in header and "before (" not in header
    assert "`--runner-process true`" in lines[0]
    record["figures"]["settings"]["runner_process"] = False  # a record of two checkouts, each in one process
    lines = report.sampling()
    header = next(line for line in lines if line.startswith("| | tokens/s"))
    assert "before (" in header and "`--runner-process true`" not in lines[0]
