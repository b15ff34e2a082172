"""`dsnn prune`: dense checkpoint -> DSNN bundle with nested magnitude masks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import tool_metadata
from .atomic import check_output_path
from .core.bundle import Bundle, save_bundle
from .core.finite import describe_nonfinite, nonfinite_tensors
from .core.groups import check_granularity
from .core.levels import validate_levels
from .core.masks import compute_codes
from .core.selection import select_prunable
from .errors import DsnnError
from .sources.opener import Source, open_source
from .structured_prune import build_structured_bundle


def build_bundle(
    source: Source,
    levels: Sequence[float],
    allocation: str = "per-layer",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    command: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
    granularity: str = "weight",
) -> Bundle:
    """Rank the selected tensors of ``source`` once and encode every level as keep codes.

    Without ``include`` patterns, a source that describes its model prunes the model's own default set
    (``adapter.default_prunable()``); any other source prunes what the generic name rules select.
    ``granularity="structured"`` ranks the family's structured groups instead (``docs/structured.md``).
    """
    levels = validate_levels(list(levels))
    if check_granularity(granularity) == "structured":
        return build_structured_bundle(source, levels, allocation, include, exclude, command)
    defaults = None if include or not source.runnable else source.adapter().default_prunable()
    names = select_prunable(source.tensors, include, exclude, defaults)
    check_finite(source.tensors)
    codes = compute_codes({n: source.tensors[n] for n in names}, levels, allocation, on_progress)
    metadata: dict[str, Any] = {
        "allocation": allocation,
        "selection": {"include": list(include), "exclude": list(exclude),
                      "defaults": "model" if defaults is not None else "name-rules"},
        "source": source.provenance(physical=True),
        "tool": tool_metadata(),
        "command": command,
    }
    if source.model_meta is not None:
        metadata["model"] = source.model_meta
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
    force: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    verify: bool = True,
    granularity: str = "weight",
) -> Bundle:
    """Open the dense ``checkpoint``, build the bundle and write it atomically to ``output``.

    ``on_stage`` is told ``loading``, ``ranking`` and ``writing`` as the work proceeds; ``on_progress(done,
    total)`` counts ranked weights; ``on_note`` gets remarks for the user (ignored non-tensor entries). The output
    path is checked before any work (an existing file is replaced only with ``force``). ``verify`` checks the
    checksums of a checkpoint written by dsnn (an exported level) before it is pruned.
    """
    check_output_path(output, force)
    check_granularity(granularity)
    stage = on_stage or _ignore
    stage("loading")
    source = open_source(checkpoint, allow_bundle=False, role="checkpoint", verify=verify)
    if source.skipped_entries:
        (on_note or _ignore)(f"ignored {len(source.skipped_entries)} non-tensor entries of the checkpoint")
    stage("ranking")
    bundle = build_bundle(source, levels, allocation, include, exclude, command, on_progress, granularity)
    stage("writing")
    save_bundle(bundle, output)
    return bundle


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint with NaN or infinite values in any floating-point tensor, pruned or not.

    Every tensor is copied into the bundle, so a NaN norm or bias would make every level of it output garbage
    (``evaluate`` reports 100 % WER); the error names the tensors before any ranking work.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        raise DsnnError(f"the checkpoint holds NaN/inf values in {describe_nonfinite(bad, tensors)}, so every level "
                        "of its bundle would output garbage",
                        "fix the checkpoint (a diverged training run? restore an earlier one) and prune again; "
                        "--exclude does not help, every tensor is copied into the bundle")


def _ignore(_: str) -> None:
    return None
