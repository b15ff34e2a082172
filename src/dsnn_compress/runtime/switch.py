"""The one declared interface of level switching: :class:`LevelSwitch`.

A bundle's levels run on one live model by switching it in place. Two implementations satisfy the protocol:

* :class:`~dsnn_compress.runtime.sparsity.DynamicSparsity` (weight granularity): ``set_level`` writes
  ``dense * mask`` into the pruned parameters; any level in [0, largest] is served (continuous levels between the
  trained ones);
* :class:`~dsnn_compress.runtime.structured.StructuredViews` (structured bundles in prefix order): ``set_level``
  narrows every group set to its kept prefix (views of the same storage); only the trained levels are served.

:class:`~dsnn_compress.runtime.runnable.LoadedModel` holds one of them (or none, for a dense checkpoint) and talks
to it through this protocol only. The level lookups (``all_levels``, ``level_index``, ``resolve_level``,
``is_trained``) are written once, in :class:`~dsnn_compress.core.levels.LevelLookups`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LevelSwitch(Protocol):
    """Switches one live module between the levels of a bundle."""

    module: torch.nn.Module
    """The live module the switch acts on."""
    levels: tuple[float, ...]
    """The trained sparse levels (the dense level 0 is implicit)."""

    @property
    def allocation(self) -> str:
        """``per-layer`` or ``global``: how the bundle allocated its levels (it orders continuous levels)."""
        ...

    @property
    def all_levels(self) -> tuple[float, ...]:
        """Every trained level, dense 0 first."""
        ...

    @property
    def level(self) -> float:
        """The active level."""
        ...

    def level_index(self, level: float | str) -> int:
        """Index (0 = dense) of the trained level ``level``; UsageError for any other value."""
        ...

    def resolve_level(self, level: float | str) -> float:
        """The value of a level this switch serves; UsageError naming what it serves otherwise."""
        ...

    def is_trained(self, level: float | str) -> bool:
        """True for the dense level and the trained levels, False for a served level between them."""
        ...

    def set_level(self, level: float | str) -> None:
        """Run ``level`` from now on (UsageError, and the active level unchanged, for a level not served)."""
        ...

    def pruned_count(self) -> int:
        """How many parameter entries the active level leaves out (0 at dense)."""
        ...

    def detach(self) -> torch.nn.Module:
        """Back to the dense level; the plain module."""
        ...
