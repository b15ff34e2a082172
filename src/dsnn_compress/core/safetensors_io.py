"""The one place safetensors files are read and written.

Reading uses the official ``safetensors`` library (:func:`read_safetensors`, :func:`read_safetensors_metadata`),
with every way a file can be damaged reported as one :class:`DsnnError`. Writing uses a small deterministic
writer: ``safetensors.torch.save_file`` copies every tensor into one in-memory buffer first; this writer streams each
tensor's bytes straight to the file (peak memory stays at the tensors themselves) and always produces the same
bytes for the same input: tensors in sorted-name order, header JSON with sorted keys, padded with spaces to a
multiple of 8 bytes as the format recommends. Files are read back with the official ``safetensors`` library.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_path
from ..errors import DsnnError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = _code


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically in safetensors format."""
    names = sorted(tensors)
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise DsnnError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise DsnnError(f"metadata key {bad[0]!r} must map a string to a string")
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in names:
            fh.write(_tensor_bytes(tensors[name]))


def _unreadable(path: Path, exc: BaseException) -> DsnnError:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return DsnnError(f"{path} is not a readable safetensors file ({text})",
                     "the file may be truncated or corrupt; re-export it")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the ``__metadata__`` of a safetensors file (DsnnError if it is damaged)."""
    src = Path(path)
    try:
        with safe_open(str(src), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(src, exc) from exc
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file without loading tensors (DsnnError if it is damaged)."""
    src = Path(path)
    try:
        with safe_open(str(src), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(src, exc) from exc
