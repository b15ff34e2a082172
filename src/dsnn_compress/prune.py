"""`dsnn prune`: dense checkpoint -> DSNN bundle with nested magnitude masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import Bundle, save_bundle
from .checkpoint import SourceCheckpoint, load_source
from .masks import compute_codes, validate_levels
from .selection import select_prunable


def model_default_prunable(source: SourceCheckpoint) -> list[str] | None:
    """The model adapter's default prunable names when the source describes its model, else ``None``."""
    meta = source.model_metadata
    if meta is None:
        return None
    from .models.registry import adapter_from_metadata

    return adapter_from_metadata(meta, source.tensors).default_prunable()


def build_bundle(
    source: SourceCheckpoint,
    levels: Sequence[float],
    allocation: str = "per-layer",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    command: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Bundle:
    """Rank the selected tensors of ``source`` once and encode every level as keep codes."""
    levels = validate_levels(list(levels))
    defaults = None if include else model_default_prunable(source)
    names = select_prunable(source.tensors, include, exclude, defaults)
    codes = compute_codes({n: source.tensors[n] for n in names}, levels, allocation, on_progress)
    metadata: dict[str, Any] = {
        "allocation": allocation,
        "selection": {"include": list(include), "exclude": list(exclude),
                      "defaults": "model" if defaults is not None else "name-rules"},
        "source": {"file": source.path.name, "sha256": source.sha256, "kind": source.kind},
        "tool": {"name": "dsnn-compress", "version": __version__},
        "command": command,
    }
    if source.model_metadata is not None:
        metadata["model"] = source.model_metadata
    if source.hf_files:
        metadata["hf_files"] = source.hf_files
    return Bundle(tensors=dict(source.tensors), codes=codes, levels=levels, metadata=metadata)


def prune_checkpoint(
    checkpoint: str | Path,
    levels: Sequence[float],
    output: str | Path,
    allocation: str = "per-layer",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    command: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Bundle:
    """Load ``checkpoint``, build the bundle and write it atomically to ``output``."""
    bundle = build_bundle(load_source(checkpoint), levels, allocation, include, exclude, command, on_progress)
    save_bundle(bundle, output)
    return bundle
