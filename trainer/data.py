"""Reading training data: JSONL {"source", "target"}, `source||target` lines, WebNLG XML.

Every reader returns a list of `Example` in file order. A source with several references appears once per
reference; `group_references` folds them back for evaluation.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    source: str
    target: str


def read_jsonl(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("source"), str)
            or not isinstance(row.get("target"), str)
        ):
            raise ValueError(
                f"{path}:{number}: each line must be a JSON object with string fields source and target"
            )
        examples.append(Example(row["source"], row["target"]))
    return examples


def read_source_target(path: Path) -> list[Example]:
    """`source||target` per line (the prefix-tuning authors' E2E/DART files). Surrounding spaces are stripped."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise ValueError(f"{path}:{number}: expected 'source||target'")
        source, target = line.split("||", 1)
        examples.append(Example(source.strip(), target.strip()))
    return examples


def webnlg_source(triples: list[str]) -> str:
    """`A_b | rel | C_d` triples -> `A b : rel : C d | ...` (underscores in entities read as spaces)."""
    parts = []
    for triple in triples:
        subject, relation, obj = (part.strip() for part in triple.split(" | ", 2))
        parts.append(f"{subject.replace('_', ' ')} : {relation} : {obj.replace('_', ' ')}")
    return " | ".join(parts)


def read_webnlg(path: Path) -> list[Example]:
    """WebNLG challenge XML: a file, or a folder searched recursively for *.xml (sorted for a stable order).

    Source = the modified triples as `subject : relation : object` joined by ` | `; one example per <lex>.
    """
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    examples = []
    for file in files:
        for entry in ET.parse(file).getroot().iter("entry"):
            triples = [t.text or "" for t in entry.iter("mtriple")]
            source = webnlg_source(triples)
            for lex in entry.iter("lex"):
                text = " ".join((lex.text or "").split())
                if text:
                    examples.append(Example(source, text))
    return examples


def read_examples(path: Path) -> list[Example]:
    """Pick the reader from the path: a folder or *.xml -> WebNLG, *.jsonl/*.json -> JSONL, else `source||target`."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".xml":
        return read_webnlg(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    return read_source_target(path)


def group_references(examples: list[Example]) -> tuple[list[str], list[list[str]]]:
    """(distinct sources in order of first appearance, all references of each)."""
    refs: dict[str, list[str]] = {}
    for ex in examples:
        refs.setdefault(ex.source, []).append(ex.target)
    return list(refs), list(refs.values())


def split_by_source(examples: list[Example], num_heldout_sources: int) -> tuple[list[Example], list[Example]]:
    """Hold out the LAST `num_heldout_sources` distinct sources (all their references), keep the rest."""
    sources, _ = group_references(examples)
    heldout = set(sources[len(sources) - num_heldout_sources :]) if num_heldout_sources else set()
    return [ex for ex in examples if ex.source not in heldout], [
        ex for ex in examples if ex.source in heldout
    ]


E2E_HELDOUT_SOURCES = 100


def e2e_split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """The project's fixed split of e2e/valid.txt: 447 MRs to train on, the last 100 MRs held out
    (used by docs/quality.md and kept out of the demo backbone's pretraining corpus)."""
    return split_by_source(examples, E2E_HELDOUT_SOURCES)
