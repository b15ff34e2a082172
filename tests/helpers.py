"""Shared helpers for the foundation tests: random state dicts, checkpoint files and a tie-aware pruning oracle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def random_state_dict(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    """A small conformer/LSTM-like state dict with mixed dtypes; ``scale`` multiplies the widths.

    Default rule prunes: ``enc.ff.weight``, ``enc.conv.weight``, ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``,
    ``half.weight`` (fp16) and ``brain.weight`` (bf16). Not pruned: biases, the norm, the head and the int64 buffer.
    """
    gen = torch.Generator().manual_seed(seed)
    w = 8 * scale

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return {
        "enc.ff.weight": randn(w, 2 * w),
        "enc.ff.bias": randn(w),
        "enc.conv.weight": randn(w, 2, 3),
        "enc.norm.weight": randn(w),
        "lstm.weight_ih_l0": randn(4 * w, w),
        "lstm.weight_hh_l0": randn(4 * w, w),
        "lstm.bias_ih_l0": randn(4 * w),
        "half.weight": randn(w, w, dtype=torch.float16),
        "brain.weight": randn(w, 5, dtype=torch.bfloat16),
        "lm_head.weight": randn(10, w),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


DEFAULT_PRUNED = sorted(
    ["enc.ff.weight", "enc.conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "half.weight", "brain.weight"]
)


def write_checkpoint(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write ``state`` as safetensors (by extension) or with ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(dict(state), str(path))
    return path


def oracle_codes(
    tensors: Mapping[str, torch.Tensor], levels: Sequence[float], allocation: str = "per-layer"
) -> dict[str, np.ndarray]:
    """Reference keep codes by a plain stable sort: smallest ``|w|`` first, ties by stream position.

    Independent of ``dsnn_compress.core.masks`` (no radix select); slow but exact for small tensors.
    """
    names = sorted(tensors)
    flats = {n: tensors[n].detach().float().abs().reshape(-1).numpy().astype(np.float64) for n in names}
    groups = [[n] for n in names] if allocation == "per-layer" else [names]
    codes = {n: np.zeros(flats[n].size, dtype=np.int64) for n in names}
    for group in groups:
        stream = np.concatenate([flats[n] for n in group])
        order = np.argsort(stream, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(stream.size)
        code = np.zeros(stream.size, dtype=np.int64)
        for s in levels:
            p = int(round(s * stream.size))
            code += rank >= p  # survives level s
        start = 0
        for n in group:
            codes[n] = code[start : start + flats[n].size].reshape(tuple(tensors[n].shape))
            start += flats[n].size
    return codes
