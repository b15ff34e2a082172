"""Running a structured bundle's levels: as prefixes on views of the shared weights (no copy), or as the
physically smaller model of a level (``docs/structured.md``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.bundle import Bundle
from ..core.depth import compact_depth, dropped_layers, in_dropped_layer
from ..core.group_format import StructuredLevels
from ..core.groups import compact_tensors
from ..core.levels import LevelLookups, Levels
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..models.registry import load_tensors_strict
from ..models.structure import family_of


def compact_adapter(bundle: Bundle, adapter: ModelAdapter, level_index: int, fmt: str = "checkpoint") -> ModelAdapter:
    """The physically smaller model of ``bundle``'s level ``level_index`` (pruned structures removed), in eval mode.

    ``adapter`` is the bundle's (full-size) model; its family builds the smaller architecture and the kept slices
    of every member tensor are loaded into it. UsageError when the family cannot express the sizes as ``fmt``.
    """
    structured = bundle.structured
    if structured is None:
        raise UsageError("only a structured bundle has physically smaller levels",
                         "prune with --granularity structured")
    family = family_of(adapter)
    dropped = dropped_layers(bundle.depth or [], level_index)
    kept = {name: count for name, count in structured.kept(level_index).items()
            if not in_dropped_layer(name, dropped)}
    refusal_hook = getattr(family, "compact_refusal", None)
    refusal = refusal_hook(kept, fmt) if callable(refusal_hook) else None
    if refusal:
        raise UsageError(f"level {Levels(bundle.levels).label(level_index)} cannot be written as {fmt}: {refusal}",
                         "export it with --format safetensors (full shape, zeroed) or prune again as the reason says")
    small = family.compact(adapter, kept, dropped) if dropped else family.compact(adapter, kept)
    tensors = compact_depth(compact_tensors(structured.specs, bundle.tensors, structured.codes, level_index), dropped)
    load_tensors_strict(small, {n: t.to(torch.float32) if t.is_floating_point() else t for n, t in tensors.items()})
    small.model.eval()
    return small


class StructuredViews(LevelLookups):
    """Level switching for a structured bundle by narrowing the live model to each set's prefix (views of the same
    storage: no weight is copied or written); a :class:`~dsnn_compress.runtime.switch.LevelSwitch`, like
    :class:`~dsnn_compress.runtime.sparsity.DynamicSparsity`, that serves the trained levels only.
    """

    def __init__(self, adapter: ModelAdapter, bundle: Bundle) -> None:
        if bundle.structured is None or not bundle.structured.prefix_ordered():
            raise DsnnError("structured views need a structured bundle in prefix order")
        self.adapter = adapter
        self.module = adapter.model
        self.levels = bundle.levels
        self.allocation = bundle.allocation
        self.structured: StructuredLevels = bundle.structured
        self._family = family_of(adapter)
        self._kept = [self.structured.kept(k) for k in range(len(bundle.levels) + 1)]
        self._dropped = [dropped_layers(bundle.depth or [], k) for k in range(len(bundle.levels) + 1)]
        self._pruned = [sum(int((c < k).sum()) for c in bundle.codes.values()) for k in range(len(bundle.levels) + 1)]
        self._index = 0

    @property
    def level(self) -> float:
        """The active level."""
        return self.all_levels[self._index]

    def resolve_level(self, level: float | str) -> float:
        """The value of a trained level (structured levels run as prefix views: only the trained ones are served, so
        :meth:`is_trained` is True for every level this accepts)."""
        return self.all_levels[self.level_index(level)]

    def kept(self, level: float | str) -> Mapping[str, int]:
        """Groups per set run at ``level``."""
        return self._kept[self.level_index(level)]

    def set_level(self, level: float | str) -> None:
        """Run ``level``: every set narrowed to its kept prefix (dense: full width)."""
        index = self.level_index(level)
        if any(self._dropped):  # widths are set on the full layer lists, then the dropped layers are left out
            self._family.set_depth(self.adapter, None)
        self._family.set_widths(self.adapter, None if index == 0 else self._kept[index])
        if self._dropped[index]:
            self._family.set_depth(self.adapter, self._dropped[index])
        self._index = index

    def pruned_count(self) -> int:
        """Weights (and biases/norm entries) the active level leaves out."""
        return self._pruned[self._index]

    def detach(self) -> torch.nn.Module:
        """Back to full width; the plain module."""
        self.set_level(0.0)
        return self.module


def views_supported(adapter: ModelAdapter, bundle: Bundle) -> bool:
    """Whether ``bundle``'s levels can run as prefix views on ``adapter`` (structured, prefix order, family hook)."""
    if bundle.structured is None or not bundle.structured.prefix_ordered():
        return False
    family = family_of(adapter)
    if bundle.depth and not callable(getattr(family, "set_depth", None)):
        return False
    hook = getattr(family, "set_widths", None)
    return callable(hook) and bool(hook(adapter, None))
