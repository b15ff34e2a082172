"""`dsnn export`: one level of a bundle as a plain checkpoint the user's own code loads unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .bundle import Bundle
from .errors import UsageError
from .safetensors_io import write_safetensors

FORMATS = ("safetensors", "torch")


def infer_format(output: Path, requested: str | None) -> str:
    """Pick the output format from ``requested`` or the file extension."""
    if requested:
        if requested not in FORMATS:
            raise UsageError(f"unknown export format {requested!r}", f"choose one of {', '.join(FORMATS)}")
        return requested
    if output.suffix in (".pt", ".pth", ".bin"):
        return "torch"
    return "safetensors"


def export_level(bundle: Bundle, level: float | str, output: str | Path, fmt: str | None = None) -> Path:
    """Write the state dict at ``level`` to ``output``: same keys and dtypes as the source, pruned weights zero."""
    out = Path(output)
    fmt = infer_format(out, fmt)
    index = bundle.level_index(level)
    state = bundle.state_dict_at(bundle.all_levels[index])
    if fmt == "safetensors":
        metadata = {"format": "pt", "dsnn_level": f"{bundle.all_levels[index]:g}"}
        source = bundle.metadata.get("source")
        if isinstance(source, dict) and source.get("sha256"):
            metadata["dsnn_source_sha256"] = str(source["sha256"])
        write_safetensors(out, state, metadata)
    else:
        with atomic_path(out) as tmp:
            torch.save(state, tmp)
    return out
