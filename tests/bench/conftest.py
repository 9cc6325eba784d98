"""The bench tests' load: a few prompts of the E2E shape (the benches' own prompts live outside the repository)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

PROMPTS = ["name[Blue Spice] | eatType[pub]", "name[Aromi] | food[Chinese] | area[city centre]"]


@pytest.fixture
def tiny_workload() -> Callable[[int, int], list[tuple[int, str]]]:
    """bench.throughput.workload's stand-in: (prefix index, prompt) per request, prefixes round-robin."""
    return lambda num_requests, num_prefixes: [
        (i % num_prefixes, PROMPTS[i % len(PROMPTS)]) for i in range(num_requests)
    ]
