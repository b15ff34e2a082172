"""Finding NaN / infinite values in weights, so that a corrupt model is refused with the tensors named."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

_CHUNK = 1 << 22
"""Values per chunk: bounds the boolean temporaries whatever the tensor size."""


def _searchable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` flattened; 8-bit floats (which the CPU reductions do not take) widened to float16."""
    flat = tensor.detach().reshape(-1)
    return flat.to(torch.float16) if flat.element_size() == 1 else flat


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (always true for integer and boolean tensors).

    One ``aminmax`` reduction per chunk (NaN propagates to both ends, an infinity shows at one): about 40x faster on
    CPU than ``isfinite(x).all()``, which materialises a boolean tensor first, and allocates nothing.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    flat = _searchable(tensor)
    for start in range(0, flat.numel(), _CHUNK):
        low, high = torch.aminmax(flat[start : start + _CHUNK])
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            return False
    return True


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or +/-inf (0 for integer and boolean tensors)."""
    if all_finite(tensor):
        return 0
    flat = _searchable(tensor)
    return sum(int((~torch.isfinite(flat[start : start + _CHUNK])).sum()) for start in range(0, flat.numel(), _CHUNK))


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> dict[str, int]:
    """``{name: count}`` of the tensors (all, or only ``names``) holding NaN or infinite values, in name order."""
    chosen = sorted(tensors if names is None else names)
    counts = {name: nonfinite_count(tensors[name]) for name in chosen}
    return {name: count for name, count in counts.items() if count}


def describe_nonfinite(counts: Mapping[str, int], tensors: Mapping[str, torch.Tensor], limit: int = 4) -> str:
    """``ctc.bias (29 of 29 values), enc.norm.weight (1 of 64 values)``, at most ``limit`` tensors then ``+N more``."""
    parts = [f"{name} ({count} of {tensors[name].numel()} values)" for name, count in list(counts.items())[:limit]]
    if len(counts) > limit:
        parts.append(f"and {len(counts) - limit} more tensor(s)")
    return ", ".join(parts)
