"""`dsnn prune`: dense checkpoint -> DSNN bundle with nested magnitude masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import tool_metadata
from .core.bundle import Bundle, save_bundle
from .core.masks import compute_codes, validate_levels
from .core.selection import select_prunable
from .sources.files import SourceCheckpoint, load_source


def source_model_metadata(source: SourceCheckpoint) -> dict[str, Any] | None:
    """The model description of ``source``: a dsnn checkpoint's own, or (Hugging Face directory of a supported
    CTC architecture) the ``hf-ctc`` description built from its text files; ``None`` otherwise."""
    meta = source.model_metadata
    # --- hf-ctc: Hugging Face directories (models/hf_ctc.py; parsing the JSON files needs no transformers)
    if meta is None and source.kind == "hf-dir" and source.hf_files:
        from .models.hf_ctc import hf_metadata_from_files

        meta = hf_metadata_from_files(source.hf_files, list(source.tensors))
    # --- end hf-ctc
    return meta


def model_default_prunable(source: SourceCheckpoint, meta: dict[str, Any] | None = None) -> list[str] | None:
    """The model adapter's default prunable names when the source describes its model, else ``None``."""
    meta = source_model_metadata(source) if meta is None else meta
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
    model_meta = source_model_metadata(source)
    defaults = None if include or model_meta is None else model_default_prunable(source, model_meta)
    names = select_prunable(source.tensors, include, exclude, defaults)
    codes = compute_codes({n: source.tensors[n] for n in names}, levels, allocation, on_progress)
    metadata: dict[str, Any] = {
        "allocation": allocation,
        "selection": {"include": list(include), "exclude": list(exclude),
                      "defaults": "model" if defaults is not None else "name-rules"},
        "source": {"file": source.path.name, "sha256": source.sha256, "kind": source.kind},
        "tool": tool_metadata(),
        "command": command,
    }
    if model_meta is not None:
        metadata["model"] = model_meta
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
