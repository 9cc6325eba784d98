"""Fixtures for the client's tests: a real `prefix-serve` on a tiny random GPT-2, and prefixes to upload.

The repository's tests/ folder holds the shared helpers (tiny_models, serving, peft_oracle); it is put on
sys.path here because this folder lies outside it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
if str(REPO_TESTS) not in sys.path:
    sys.path.insert(0, str(REPO_TESTS))

ADMIN_KEY = "test-admin-key-0123456789"
MAX_BODY_BYTES = 1 << 20  # small, so that the 413 test sends 1 MiB rather than 64


@pytest.fixture(scope="session")
def client_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("client-tiny-gpt2"))


@pytest.fixture(scope="session")
def served(client_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One prefix-serve process for the client tests, with auth on (PREFIXSERVE_ADMIN_KEY)."""
    from serving import running_server

    root = tmp_path_factory.mktemp("client-server")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY, "PREFIXSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with running_server(client_model_dir, str(root / "store"), root / "logs", env=env) as server:
        yield server


@pytest.fixture(scope="session")
def admin_key() -> str:
    return ADMIN_KEY


@pytest.fixture(scope="session")
def max_body_bytes() -> int:
    return MAX_BODY_BYTES


@pytest.fixture(scope="session")
def server_url(served: object) -> str:
    return served.url  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def native_prefix_file(client_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native prefix file for the tiny GPT-2 (2 layers, 4 heads, head_dim 16), 5 virtual tokens."""
    import torch

    from prefix_store.format import Prefix, save_prefix

    generator = torch.Generator().manual_seed(1)
    tensor = torch.randn(2, 2, 4, 5, 16, generator=generator)  # [num_layers, 2, num_heads, P, head_dim]
    path = tmp_path_factory.mktemp("native") / "prefix.safetensors"
    path.write_bytes(save_prefix(Prefix(model_type="gpt2", targets={"decoder": tensor})))
    return path


@pytest.fixture(scope="session")
def peft_adapter_dir(client_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT prefix-tuning adapter directory (adapter_model.safetensors + adapter_config.json), random values."""
    from peft_oracle import make_peft_adapter

    return make_peft_adapter(client_model_dir, "gpt2", 4, tmp_path_factory.mktemp("peft") / "adapter", seed=2)
