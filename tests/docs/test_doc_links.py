"""Every relative link in the README, CONTRIBUTING.md and the docs resolves: the file exists and, for
`file.md#anchor`, a heading of that file has that anchor (GitHub's rule for heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "bench" / "README.md",
        ROOT / "clients" / "python" / "README.md",
        *(ROOT / "docs").rglob("*.md"),
    ]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The page without fenced code blocks or inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's heading id: lowercased, punctuation dropped (letters, digits, spaces, - and _ kept), spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check offline
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(
                f"{target}: {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} does not exist"
            )
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with id #{anchor} in {resolved.relative_to(ROOT)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    """A page nobody links to is a page nobody finds: walk the links from README.md."""
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached or not page.exists() or page.suffix != ".md":
            continue
        reached.add(page)
        for target in LINK.findall(prose(page.read_text())):
            path_part = target.partition("#")[0]
            if path_part and not re.match(r"[a-z][a-z0-9+.-]*:", target):
                found = (page.parent / path_part).resolve()
                todo.append(found / "README.md" if found.is_dir() else found)
    unreachable = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in reached]
    assert unreachable == []


def test_slug_follows_github() -> None:
    assert slug("How do I upload a prefix?") == "how-do-i-upload-a-prefix"
    assert slug("Deployment: docker-compose.yml, docker/") == "deployment-docker-composeyml-docker"
    assert slug("The runner process (`--runner-process`)") == "the-runner-process---runner-process"
    assert slug("Low data: prefix-tuning vs fine-tuning, 50–500 examples") == (
        "low-data-prefix-tuning-vs-fine-tuning-50500-examples"
    )
