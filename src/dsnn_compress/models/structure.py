"""Family-agnostic access to the structured-pruning hooks of model families (``docs/structured.md``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from ..core.groups import GroupSpec
from ..errors import DsnnError, UsageError
from .base import ModelAdapter
from .registry import FAMILIES, get_family


def structured_families() -> list[str]:
    """Names of the registered families that declare structured groups."""
    return sorted(name for name, factory in FAMILIES.items() if callable(getattr(factory, "structured_groups", None)))


def family_of(adapter: ModelAdapter) -> Any:
    """The factory of ``adapter``'s family."""
    return get_family(adapter.family, DsnnError)


def model_groups(adapter: ModelAdapter, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[GroupSpec]:
    """The structured group sets of ``adapter``'s model; ``include``/``exclude`` globs match set names
    (``layers.3.ff1``). UsageError when the family declares none, naming the families that do."""
    hook = getattr(family_of(adapter), "structured_groups", None)
    if not callable(hook):
        raise UsageError(f"structured pruning is not available for {adapter.family} models (the family declares no "
                         "structured groups)",
                         f"use --granularity weight, or a model of a family that supports it: "
                         f"{', '.join(structured_families())}")
    specs = list(hook(adapter))
    for pattern in include:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in specs):
            raise UsageError(f"--include pattern {pattern!r} matches no group set",
                             f"group sets are named like {specs[0].name}, {specs[-1].name}")
    if include:
        specs = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) for p in include)]
    specs = [s for s in specs if not any(fnmatch.fnmatchcase(s.name, p) for p in exclude)]
    if not specs:
        raise UsageError("no group set left to prune", "check --include/--exclude patterns")
    return specs
