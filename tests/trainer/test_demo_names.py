"""The venue names scripts/train_demo_prefixes.py invents for the E2E prefix's training pairs: real words, never
a held-out venue (the held-out MRs' names must stay unseen in training)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import scripts.train_demo_prefixes as demo  # noqa: E402

WORDS = "harbour stone bridge wild wood river garden castle market crown oak lantern"


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny stand-in for ../shared/data: WikiText text, and 130 MRs of which the last 100 are held out."""
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text((" = Title = \n " + WORDS + " Sorrento Wildwood\n") * 6)
    (tmp_path / "e2e").mkdir()
    lines = [f"name : Venue {i} | food : English||Venue {i} serves English food ." for i in range(30)]
    lines += [f"name : Wildwood | food : Thai | price : {i}||Wildwood serves Thai food ." for i in range(99)]
    lines += ["name : Oak | near : The Sorrento||Oak is near The Sorrento ."]
    (tmp_path / "e2e" / "valid.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(demo, "DATA", tmp_path)
    for cached in (demo.name_words, demo.heldout_venues):
        cached.cache_clear()
    yield tmp_path
    for cached in (demo.name_words, demo.heldout_venues):
        cached.cache_clear()


def test_word_names_are_real_words_and_never_a_heldout_venue(data: Path) -> None:
    assert demo.heldout_venues() == {"wildwood", "oak", "the sorrento"}
    words = set(demo.name_words())
    assert "Harbour" in words and "Stone" in words
    assert not words & {"Wildwood", "Oak", "Sorrento", "The"}  # every word of a held-out venue is left out
    rng = random.Random(0)
    names = [demo.word_name(rng) for _ in range(2000)]
    assert not {n.lower() for n in names} & demo.heldout_venues()
    assert {len(n.removeprefix("The ").split()) for n in names} == {1, 2, 3}
    assert any(n.startswith("The ") for n in names) and any(not n.startswith("The ") for n in names)
    assert any(" " not in n and n not in words for n in names)  # joined from two words
    again = random.Random(0)
    assert names[:50] == [demo.word_name(again) for _ in range(50)]  # seeded


def test_rename_venues_with_word_names_replaces_name_and_near(data: Path) -> None:
    from trainer.data import Example

    pairs = [Example("name : The Eagle | near : Burger King", "The Eagle is near Burger King .")]
    (renamed,) = demo.rename_venues(pairs, fraction=1.0, style="words")
    assert "The Eagle" not in renamed.source + renamed.target and "Burger King" not in renamed.target
    name = renamed.source.split(" | ")[0].partition(" : ")[2]
    assert renamed.target.startswith(name)


def test_rename_entities_replaces_what_the_text_spells_as_the_triples_do(data: Path) -> None:
    from trainer.data import Example

    pair = Example(
        'Elliot See : birthPlace : Dallas | Elliot See : deathDate : "1966-02-28" | '
        "Elliot See : nationality : United States | Dallas Cowboys : city : Dallas",
        "Elliot See, born in Dallas (home of the Dallas Cowboys), died in 1966; he was a US national.",
    )
    (renamed,) = demo.rename_entities([pair], fraction=1.0)
    for gone in ("Elliot See", "Dallas"):
        assert gone not in renamed.source and gone not in renamed.target
    assert '"1966-02-28"' in renamed.source  # no letter: kept
    assert "United States" in renamed.source  # the text says "US": kept
    triples = [t.split(" : ") for t in renamed.source.split(" | ")]
    person, city, team = triples[0][0], triples[0][2], triples[3][0]
    assert renamed.target.startswith(person + ", born in " + city + " (home of the " + team + ")")
    assert len({person, city, team}) == 3  # one invented name per entity, the longest replaced first
    assert demo.rename_entities([pair], fraction=0.0) == [pair]


def test_longest_references_keeps_each_sets_longest_or_longer_half() -> None:
    from trainer.data import Example

    pairs = [Example("a : r : b", "one two"), Example("a : r : b", "one two three"), Example("a : r : b", "x y z"),
             Example("c : r : d", "short")]  # fmt: skip
    longest = demo.longest_references(pairs, "longest")
    assert [e.target for e in longest] == ["one two three", "x y z", "short"]  # ties kept; every set stays
    longer = demo.longest_references(pairs, "longer")
    assert [e.target for e in longer] == ["one two three", "x y z", "short"]
    pairs.append(Example("a : r : b", "w"))
    assert [e.target for e in demo.longest_references(pairs, "longer")] == [
        "one two",
        "one two three",
        "x y z",
        "short",
    ]
