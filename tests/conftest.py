from __future__ import annotations

from pathlib import Path

import peft_oracle
import pytest
import serving
from tiny_models import build_bart, build_gpt2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the PEFT parity tests run the backbone, PEFT's oracle and prefix-serve (default cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    serving.DEVICE = peft_oracle.DEVICE = config.getoption("--device")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bart(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session", params=["gpt2", "bart"])
def peft_case(request, tiny_gpt2_dir: Path, tiny_bart_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """PEFT adapters of lengths 3-12 on a tiny backbone, and PEFT's own greedy output for each prompt."""
    from peft_oracle import LENGTHS, MAX_NEW, PROMPTS, make_peft_adapter, peft_generate

    kind = request.param
    model_dir = tiny_gpt2_dir if kind == "gpt2" else tiny_bart_dir
    root = tmp_path_factory.mktemp(f"peft-{kind}")
    adapters = {
        f"t/a{i}": make_peft_adapter(model_dir, kind, n, root / f"a{i}", seed=10 + i)
        for i, n in enumerate(LENGTHS)
    }
    expected = {None: peft_generate(model_dir, kind, None, PROMPTS, MAX_NEW)}
    for prefix_id, path in adapters.items():
        expected[prefix_id] = peft_generate(model_dir, kind, path, PROMPTS, MAX_NEW)
    return kind, model_dir, adapters, expected
