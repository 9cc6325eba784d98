"""bench/sampling.py runs end to end on a tiny load: two real servers up at once (this checkout twice, the
second under another name as --before-root), every mode's rounds interleaved across them, each round bringing
back every token, and the report printing both servers' rows with the engine-wait and page-fault columns. The bench's prompts
and tokenizer data live outside the repository; here the prompts are a few lines of their shape and the
backbone is the tests' tiny GPT-2 (servers, uploads and rounds are real)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_bench_interleaves_two_servers_on_a_tiny_load(
    tiny_gpt2_dir: Path, tiny_workload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from bench import sampling

    monkeypatch.setattr(sampling, "build_backbone", lambda *args: tiny_gpt2_dir)
    monkeypatch.setattr(sampling, "workload", tiny_workload)
    rounds: list[tuple[str, str]] = []
    one_round = sampling.one_round
    monkeypatch.setattr(
        sampling,
        "one_round",
        lambda client, url, mode, *rest: rounds.append((url, mode)) or one_round(client, url, mode, *rest),
    )
    before = tmp_path / "before"  # this checkout under another name, as a worktree of another commit would be
    before.symlink_to(ROOT)
    argv = ["bench.sampling", "--prefixes", "2", "--requests", "4", "--new-tokens", "5", "--repeats", "2",
            "--before-root", str(before), "--no-record"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    import serving

    root_before = serving.ROOT
    sampling.main()  # raises when a round brings back fewer tokens than asked
    # each checkout runs through start_server's `checkout`; the bench never moves the tests' ROOT (a guard)
    assert root_before == serving.ROOT
    urls = list(dict.fromkeys(url for url, _ in rounds))
    modes = list(sampling.MODES)
    assert len(urls) == 2  # both servers up at once, each measured in turn, every mode, each repeat
    assert rounds == [(url, mode) for _ in range(2) for url in urls for mode in modes]
    out = capsys.readouterr().out
    assert "faults/step" in out and "wait ms" in out and out.count("server from") == 2
    for mode in modes:
        rows = [line for line in out.splitlines() if line.startswith(mode + " ")]
        assert len(rows) == 2, out
        # tokens/s, x greedy, paired median, (range), step, forward, host, wait ms (the engine off the CPU)
        for row in rows:
            assert float(row[len(mode) :].split()[7]) >= 0, row
            # the paired ratio: median (min-max) of each repeat's rate over its greedy round's; greedy's is 1
            paired = row[len(mode) :].split()[2:4]
            assert float(paired[0]) > 0 and paired[1].startswith("(") and paired[1].endswith(")"), row
            if mode == "greedy":
                assert paired == ["1.00", "(1.00-1.00)"], row
