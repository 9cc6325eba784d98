"""The registry of backbone families: each module here registers one FamilySpec.

Adding a family = adding one module that calls `register(FamilySpec(...))` (plus its forward passes, named
by the spec). Modules are found by listing this package, so this file never names them, and they import
only spec.py (FamilySpec, register), never each other or the server/trainer code (loaded by dotted path).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from prefix_store.families.spec import (
    _REGISTRY,
    BackboneError,
    FamilySpec,
    GenerationRules,
    generation_rules,
    register,
)

__all__ = [
    "BackboneError",
    "FamilySpec",
    "GenerationRules",
    "family",
    "generation_rules",
    "load_class",
    "register",
]

_NOT_FAMILIES = {"spec"}


def families() -> dict[str, FamilySpec]:
    """Every registered family by model_type (importing the family modules on first use)."""
    if not _REGISTRY:
        for module in pkgutil.iter_modules(__path__):
            if module.name not in _NOT_FAMILIES:
                importlib.import_module(f"{__name__}.{module.name}")
    return dict(_REGISTRY)


def family(model_type: str) -> FamilySpec:
    """The family for a config's model_type; BackboneError naming the supported ones otherwise."""
    known = families()
    if model_type not in known:
        raise BackboneError(
            f"model_type {model_type!r} is not supported; prefixserve serves "
            + " or ".join(spec.description for spec in known.values())
        )
    return known[model_type]


def load_class(dotted: str) -> Any:
    """ "module.path:Name" -> the object (the spec names implementation classes without importing them)."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)
