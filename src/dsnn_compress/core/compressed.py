"""Compressed level files: pruned weights in compressed-tensors' ``sparse-bitmask`` layout.

A weight tensor ``P.weight`` of shape ``[*lead, C]`` is replaced by four tensors (the layout of compressed-tensors'
``BitmaskCompressor``, format ``sparse-bitmask``; ``docs/compressed.md``):

* ``P.shape``: int64 ``[ndim]``, the dense shape;
* ``P.compressed``: 1-D, the kept values in row-major order, in the weight's own dtype;
* ``P.bitmask``: uint8 ``[*lead, ceil(C / 8)]``, the keep mask packed along the last axis, little-endian bit
  order (``numpy.packbits(mask, axis=-1, bitorder="little")``);
* ``P.row_offsets``: int64 ``[prod(lead)]``, the index in ``P.compressed`` where each row starts.

The mask is "the stored bit pattern is not zero": a level's pruned weights are exact ``+0.0``, so they are dropped,
while a kept ``-0.0`` keeps its sign. Decompression (zeros, then the values scattered where the mask is set) is
therefore bit-exact. Only names ending in ``.weight`` are candidates (the names compressed-tensors decompresses), and
a tensor is stored this way only when that makes it smaller than dense. A weight of more than two dimensions (a
convolution ``[out, in, k]``) is compressed as its 2-D view ``[out, in * k]``, so that a pointwise convolution
(``k = 1``) does not pay a mask byte per weight; its own shape is then recorded in the metadata and restored on
reading (compressed-tensors, which compresses Linear layers only, would return the 2-D view). The safetensors
metadata key :data:`COMPRESSION_KEY` lists the compressed tensors, so a reader never guesses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import DsnnError, UsageError

COMPRESSION_FORMAT = "sparse-bitmask"
COMPRESSION_KEY = "dsnn_compression"
"""Safetensors ``__metadata__`` key: JSON ``{"format": "sparse-bitmask", "tensors": [NAME, ...], "shapes": {NAME:
shape}}`` (``shapes``: the tensors of more than two dimensions, stored as their 2-D view)."""
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def prefix_of(name: str) -> str:
    """``layer.weight`` -> ``layer`` (the prefix the four parts are stored under)."""
    return name[: -len(".weight")]


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    """UsageError naming the dtypes that work when ``tensor`` cannot be stored compressed."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        shown = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise UsageError(f"compressed export supports {shown} weights, but {name} is "
                         f"{str(tensor.dtype).replace('torch.', '')}", "export it without --compress")


def keep_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Where the stored bit pattern of ``tensor`` is not zero (so ``-0.0`` counts as kept, ``+0.0`` does not)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]) != 0


def compressed_bytes(shape: Iterable[int], kept: int, element_size: int) -> int:
    """Bytes of the four parts for a tensor of ``shape`` with ``kept`` stored values."""
    shape = tuple(shape)
    rows = math.prod(shape[:-1])
    return kept * element_size + rows * ((shape[-1] + 7) // 8) + 8 * len(shape) + 8 * rows


def compress_tensor(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four parts (keyed ``shape``, ``compressed``, ``bitmask``, ``row_offsets``) of one tensor."""
    dense = tensor.detach().to("cpu").contiguous()
    mask = keep_mask(dense)
    rows = mask.reshape(-1, dense.shape[-1])
    counts = rows.sum(dim=1)
    packed = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    return {
        "shape": torch.tensor(list(dense.shape), dtype=torch.int64),
        "compressed": dense[mask],
        "bitmask": torch.from_numpy(np.ascontiguousarray(packed)),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def decompress_tensor(parts: Mapping[str, torch.Tensor], name: str = "tensor") -> torch.Tensor:
    """Inverse of :func:`compress_tensor` (DsnnError when the parts do not fit together)."""
    shape = [int(v) for v in parts["shape"].reshape(-1).tolist()]
    values, bitmask = parts["compressed"], parts["bitmask"]
    if not shape or any(v <= 0 for v in shape) or bitmask.dtype != torch.uint8 \
            or list(bitmask.shape) != [*shape[:-1], (shape[-1] + 7) // 8]:
        raise DsnnError(f"the compressed parts of {name} do not fit its shape {shape}", "the file is corrupt")
    mask = np.unpackbits(bitmask.numpy(), axis=-1, count=shape[-1], bitorder="little").astype(bool)
    if int(mask.sum()) != values.numel() or values.dim() != 1:
        raise DsnnError(f"{name}: the bitmask keeps {int(mask.sum())} weights but {values.numel()} values are "
                        "stored", "the file is corrupt")
    out = torch.zeros(shape, dtype=values.dtype)
    out[torch.from_numpy(mask)] = values
    return out


def compress_state_dict(state: Mapping[str, torch.Tensor], candidates: Iterable[str]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with each candidate ``*.weight`` tensor stored compressed when that is smaller than dense.

    Returns the tensors to write and the metadata entry (:data:`COMPRESSION_KEY`) that lists the compressed
    names. Candidates are checked for a supported dtype first (UsageError naming the dtypes that work).
    """
    chosen = sorted(n for n in set(candidates) if n in state and n.endswith(".weight"))
    for name in chosen:
        check_dtype(name, state[name])
    stored: dict[str, torch.Tensor] = dict(state)
    compressed: list[str] = []
    shapes: dict[str, list[int]] = {}
    for name in chosen:
        tensor = state[name] if state[name].dim() <= 2 else state[name].reshape(state[name].shape[0], -1)
        kept = int(keep_mask(tensor).sum())
        if tensor.dim() == 0 or compressed_bytes(tensor.shape, kept, tensor.element_size()) \
                >= tensor.numel() * tensor.element_size():
            continue
        if any(f"{prefix_of(name)}.{part}" in state for part in PARTS):
            continue  # a name clash with a real tensor: keep this one dense
        del stored[name]
        for part, value in compress_tensor(tensor).items():
            stored[f"{prefix_of(name)}.{part}"] = value
        compressed.append(name)
        if state[name].dim() > 2:
            shapes[name] = list(state[name].shape)
    record: dict[str, Any] = {"format": COMPRESSION_FORMAT, "tensors": compressed}
    if shapes:
        record["shapes"] = shapes
    return stored, {COMPRESSION_KEY: json.dumps(record, sort_keys=True)}


def compression_record(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The parsed :data:`COMPRESSION_KEY` entry of a file's metadata, or None for a file that is not compressed."""
    raw = metadata.get(COMPRESSION_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("format") != COMPRESSION_FORMAT \
            or not isinstance(record.get("tensors"), list) or not isinstance(record.get("shapes", {}), dict):
        raise DsnnError(f"metadata {COMPRESSION_KEY!r} is not a {COMPRESSION_FORMAT} record", "the file is corrupt")
    return record


def decompress_state_dict(stored: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                          ) -> dict[str, torch.Tensor]:
    """The dense state dict of a file written by :func:`compress_state_dict` (unchanged if not compressed)."""
    record = compression_record(metadata)
    if record is None:
        return dict(stored)
    out = dict(stored)
    for name in record["tensors"]:
        keys = {part: f"{prefix_of(str(name))}.{part}" for part in PARTS}
        missing = [key for key in keys.values() if key not in stored]
        if missing:
            raise DsnnError(f"compressed tensor {name} lacks {missing[0]}", "the file is corrupt")
        dense = decompress_tensor({part: stored[key] for part, key in keys.items()}, str(name))
        shape = (record.get("shapes") or {}).get(str(name))
        if shape is not None:
            if not isinstance(shape, list) or math.prod(int(v) for v in shape) != dense.numel():
                raise DsnnError(f"compressed tensor {name} has {dense.numel()} weights, not shape {shape}",
                                "the file is corrupt")
            dense = dense.reshape([int(v) for v in shape])
        out[str(name)] = dense
        for key in keys.values():
            del out[key]
    return out
