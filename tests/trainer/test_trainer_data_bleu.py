"""Data readers and BLEU against all references of a source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from trainer.data import Example, group_references, read_examples, split_by_source
from trainer.evaluate import corpus_bleu

WEBNLG_XML = """<benchmark><entries>
  <entry category="Airport" eid="Id1" size="2">
    <originaltripleset><otriple>Aarhus | leaderName | Jacob_Bundsgaard</otriple></originaltripleset>
    <modifiedtripleset>
      <mtriple>Aarhus | leaderName | Jacob_Bundsgaard</mtriple>
      <mtriple>Aarhus_Airport | cityServed | Aarhus</mtriple>
    </modifiedtripleset>
    <lex comment="good" lid="Id1">Aarhus airport serves the city of Aarhus.</lex>
    <lex comment="good" lid="Id2">Jacob Bundsgaard leads
      Aarhus.</lex>
  </entry>
</entries></benchmark>"""


def test_bleu_uses_every_reference() -> None:
    hypotheses = ["the cat sat on the mat .", "a dog barks loudly ."]
    references = [["a cat was on a mat .", "the cat sat on the mat ."], ["a dog barks loudly ."]]
    assert corpus_bleu(hypotheses, references) == pytest.approx(100.0)
    only_first = corpus_bleu(hypotheses, [refs[:1] for refs in references])
    assert only_first < 100.0


def test_bleu_matches_sacrebleu_with_uneven_reference_counts() -> None:
    hypotheses = ["the cat is on the mat", "there is a dog", "hello world"]
    references = [["the cat sat on the mat", "a cat is on the mat", "the cat is here"], ["there is a big dog"],
                  ["hello there world", "hello world !"]]  # fmt: skip
    streams = [["the cat sat on the mat", "there is a big dog", "hello there world"],
               ["a cat is on the mat", None, "hello world !"], ["the cat is here", None, None]]  # fmt: skip
    assert corpus_bleu(hypotheses, references) == pytest.approx(
        sacrebleu.corpus_bleu(hypotheses, streams).score
    )


def test_group_references_and_split_by_distinct_source() -> None:
    examples = [Example("a", "1"), Example("a", "2"), Example("b", "3"), Example("c", "4"), Example("c", "5")]
    assert group_references(examples) == (["a", "b", "c"], [["1", "2"], ["3"], ["4", "5"]])
    train, heldout = split_by_source(examples, 1)
    assert {ex.source for ex in heldout} == {"c"} and len(heldout) == 2
    assert {ex.source for ex in train} == {"a", "b"}


def test_readers(tmp_path: Path) -> None:
    (tmp_path / "pairs.txt").write_text("name : A | food : Thai||A serves Thai food . \n\nname : B||B .\n")
    assert read_examples(tmp_path / "pairs.txt") == [
        Example("name : A | food : Thai", "A serves Thai food ."),
        Example("name : B", "B ."),
    ]
    rows = [{"source": "s1", "target": "t1"}, {"source": "s2", "target": "t2"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_examples(tmp_path / "data.jsonl") == [Example("s1", "t1"), Example("s2", "t2")]
    (tmp_path / "webnlg").mkdir()
    (tmp_path / "webnlg" / "a.xml").write_text(WEBNLG_XML)
    source = "Aarhus : leaderName : Jacob Bundsgaard | Aarhus Airport : cityServed : Aarhus"
    assert read_examples(tmp_path / "webnlg") == [
        Example(source, "Aarhus airport serves the city of Aarhus."),
        Example(source, "Jacob Bundsgaard leads Aarhus."),
    ]


def test_jsonl_reader_names_the_bad_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"source": "s", "target": "t"}\n{"source": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_examples(tmp_path / "bad.jsonl")
