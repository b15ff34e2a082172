"""`dsnn prune --granularity structured`: rank a model's structured groups and write nested group codes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import tool_metadata
from .core.bundle import Bundle
from .core.group_format import structured_bundle_parts
from .core.groups import compute_group_codes
from .errors import UsageError
from .models.structure import model_groups, structured_families
from .sources.opener import Source


def build_structured_bundle(source: Source, levels: Sequence[float], allocation: str = "per-layer",
                            include: Sequence[str] = (), exclude: Sequence[str] = (), command: Any = None) -> Bundle:
    """The structured bundle of ``source``: group codes from one RMS ranking, each set permuted into descending
    code order (every level a prefix), member tensors coded with the expanded weight codes."""
    if not source.runnable:
        raise UsageError(f"{source.path} carries no model description, so its structures (neurons, heads, channels) "
                         "are unknown", "structured pruning needs a model dsnn can rebuild (a dsnn checkpoint or a "
                         f"supported model directory) of a family that declares groups: "
                         f"{', '.join(structured_families())}; or use --granularity weight")
    adapter = source.adapter()
    specs = model_groups(adapter, include, exclude)
    group_codes = compute_group_codes(specs, source.tensors, list(levels), allocation)
    tensors, codes, structured = structured_bundle_parts(specs, source.tensors, group_codes, len(levels))
    metadata: dict[str, Any] = {
        "allocation": allocation,
        "selection": {"include": list(include), "exclude": list(exclude), "defaults": "model-groups"},
        "source": source.provenance(physical=True),
        "tool": tool_metadata(),
        "command": command,
        "model": source.model_meta,
    }
    if source.hf_files:
        metadata["hf_files"] = source.hf_files
    return Bundle(tensors=tensors, codes=codes, levels=tuple(levels), metadata=metadata, structured=structured)
