"""Every error code the server can answer with is documented in docs/api.md (a client reads the code)."""

from __future__ import annotations

import re

from serving import ROOT

RAISES = re.compile(r"(?:ServiceError|PrefixFormatError|error_response)\(\s*(?:\d+,\s*)?\"([a-z_]+)\"")


def raised_codes() -> set[str]:
    codes = set()
    for package in ("server", "prefix_store"):
        for path in (ROOT / package).rglob("*.py"):
            codes |= set(RAISES.findall(path.read_text()))
    return codes


def test_every_error_code_is_documented() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    codes = raised_codes()
    assert len(codes) > 20  # the pattern still finds the server's errors
    assert sorted(c for c in codes if f"`{c}`" not in page) == []
