"""The one place safetensors files are read and written.

Reading maps a file **once** (:func:`open_safetensors`) and takes the header, the metadata and every tensor from
that one mapping, so a writer that replaces the path meanwhile (``os.replace``, as every dsnn writer does) leaves
this reader with the old file, complete, or - on the next open - the new one, never a mixture of the two. The
header is checked against the safetensors rules (header length, UTF-8 JSON object starting with ``{``, known
dtypes, offsets contiguous from 0 that match dtype and shape and cover the data exactly), and every way a file can
be damaged is reported as one :class:`DsnnError`. Tensors are copied out of the mapping, so they do not depend on
the file afterwards. With ``verify`` the ``dsnn_checksums`` entry (:mod:`.checksums`) is checked on the copied
bytes.

Writing uses a small deterministic writer: ``safetensors.torch.save_file`` copies every tensor into one in-memory
buffer first; this writer streams each tensor's bytes straight to the file (peak memory stays at the tensors
themselves) and always produces the same bytes for the same input: tensors in sorted-name order, header JSON with
sorted keys, padded with spaces to a multiple of 8 bytes as the format recommends, and the per-tensor checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import reprlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import DsnnError
from .checksums import (
    CHECKSUM_KEY,
    INTEGRITY_NONE,
    INTEGRITY_SKIPPED,
    INTEGRITY_VERIFIED,
    check_metadata,
    check_names,
    checksum_entry,
    corrupt_error,
    parse_checksums,
    tensor_digest,
)

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
TORCH_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_NAMES.items()}
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
"""Bytes per element of every dtype code of the safetensors format."""
MAX_HEADER_BYTES = 100_000_000
"""The safetensors limit on the JSON header."""


# ------------------------------------------------------------------------------------------------------ writing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically in safetensors format, with the
    ``dsnn_checksums`` entry (:mod:`.checksums`) of the tensors and the metadata (any given one is replaced)."""
    names = sorted(tensors)
    header: dict[str, object] = {}
    digests: dict[str, str] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise DsnnError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        code = DTYPE_NAMES[tensor.dtype]
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        digests[name] = tensor_digest(code, tensor.shape, _tensor_bytes(tensor))
        offset += size
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DsnnError(f"metadata key {bad[0]!r} must map a string to a string")
    meta[CHECKSUM_KEY] = checksum_entry(digests, meta)
    header["__metadata__"] = meta
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in names:
            fh.write(_tensor_bytes(tensors[name]))


# ------------------------------------------------------------------------------------------------------ reading


class _Damaged(Exception):
    """A violation of the safetensors layout (turned into a DsnnError naming the file)."""


def _unreadable(path: Path, exc: BaseException) -> DsnnError:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return DsnnError(f"{path} is not a readable safetensors file ({text})",
                     "the file may be truncated or corrupt; re-export it")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in the file: dtype code, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Damaged(f"header names {key!r} twice")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _Damaged(f"header holds {name}, which is not JSON")


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _byte_size(entry: TensorEntry, limit: int) -> int:
    """Bytes of ``entry``'s tensor, or ``-1`` as soon as it exceeds ``limit`` (a header of huge dimensions must not
    make a huge integer product)."""
    if 0 in entry.shape:
        return 0
    size = DTYPE_SIZES[entry.dtype]
    for dim in entry.shape:
        size *= dim
        if size > limit:
            return -1
    return size


def parse_header(head: bytes, file_size: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Metadata and tensor entries of a file of ``file_size`` bytes whose first bytes are ``head`` (at least
    ``8 + header length``); raises ``_Damaged`` for anything the safetensors rules reject."""
    if file_size < 8 or len(head) < 8:
        raise _Damaged(f"the file has {file_size} bytes, fewer than the 8 of a header length")
    length = int.from_bytes(head[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise _Damaged(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size or len(head) < 8 + length:
        raise _Damaged(f"header length {length} runs past the end of the {file_size}-byte file")
    try:
        text = bytes(head[8 : 8 + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Damaged("the header is not UTF-8") from None
    if not text.startswith("{"):
        raise _Damaged("the header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _Damaged(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _Damaged("the header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is None:
        raw_meta = {}
    if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
        raise _Damaged("__metadata__ is not a map of strings to strings")
    data_start = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _Damaged(f"the entry of {name} is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _Damaged(f"{name} has an unknown dtype {reprlib.repr(dtype)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _Damaged(f"{name} has an invalid shape {reprlib.repr(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise _Damaged(f"{name} has invalid data_offsets {reprlib.repr(offsets)}")
        entries[name] = TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position or entry.end < entry.start:
            raise _Damaged(f"the data of {name} does not start where the previous tensor ends")
        if _byte_size(entry, file_size) != entry.end - entry.start:
            raise _Damaged(f"{name}: {entry.end - entry.start} bytes do not hold a {entry.dtype} "
                           f"tensor of shape {reprlib.repr(list(entry.shape))}")
        position = entry.end
    if position != file_size:
        raise _Damaged(f"the tensors end at byte {position} but the file has {file_size}")
    return dict(raw_meta), entries


class SafetensorsFile:
    """A safetensors file mapped once: its :attr:`metadata`, :attr:`entries` and, on demand, tensors, checksum
    verification and the sha256 of the whole file, all from the same mapping (the file as it was when opened)."""

    def __init__(self, path: Path, buffer: mmap.mmap, metadata: dict[str, str],
                 entries: dict[str, TensorEntry]) -> None:
        self.path = path
        self.metadata = metadata
        self.entries = entries
        self.integrity = INTEGRITY_SKIPPED if CHECKSUM_KEY in metadata else INTEGRITY_NONE
        """``verified``, ``not verified`` or ``no checksums``: what :meth:`load` established."""
        self._buffer = buffer

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file (tensors already loaded stay valid)."""
        with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with it
            self._buffer.close()

    def verify_metadata(self) -> None:
        """Check the metadata against its recorded digest (nothing to do without checksums)."""
        checksums = parse_checksums(str(self.path), self.metadata)
        if checksums is not None:
            check_metadata(str(self.path), checksums, self.metadata)

    def load(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor, copied out of the mapping; with ``verify`` the metadata and every tensor are checked
        against the ``dsnn_checksums`` entry when there is one (DsnnError naming the damaged tensors)."""
        checksums = parse_checksums(str(self.path), self.metadata) if verify else None
        if checksums is not None:
            check_metadata(str(self.path), checksums, self.metadata)
            check_names(str(self.path), checksums, list(self.entries))
        tensors: dict[str, torch.Tensor] = {}
        damaged: list[str] = []
        for name, entry in self.entries.items():
            raw = self._copy(name, entry)
            expected = checksums.tensors[name] if checksums is not None else None
            if expected is not None and tensor_digest(entry.dtype, entry.shape, raw.numpy()) != expected:
                damaged.append(name)
            tensors[name] = raw.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
        if damaged:
            raise corrupt_error(str(self.path), sorted(damaged))
        if checksums is not None:
            self.integrity = INTEGRITY_VERIFIED
        return tensors

    def _copy(self, name: str, entry: TensorEntry) -> torch.Tensor:
        if entry.dtype not in TORCH_DTYPES:
            raise DsnnError(f"{self.path}: tensor {name} has dtype {entry.dtype}, which this torch cannot hold",
                            "upgrade torch or re-save the tensor in another dtype")
        size = entry.end - entry.start
        out = torch.empty(size, dtype=torch.uint8)
        if size:
            out.numpy()[:] = np.frombuffer(self._buffer, dtype=np.uint8, count=size, offset=entry.start)
        return out

    def sha256(self) -> str:
        """Hex sha256 of the whole file as mapped."""
        digest = hashlib.sha256()
        view = memoryview(self._buffer)
        try:
            for start in range(0, len(view), 1 << 24):
                digest.update(view[start : start + (1 << 24)])
        finally:
            view.release()
        return digest.hexdigest()


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Map ``path`` once and parse its header (DsnnError if it is missing, unreadable or damaged)."""
    src = Path(path)
    try:
        with open(src, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _Damaged(f"the file has {size} bytes, fewer than the 8 of a header length")
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise DsnnError(f"{src} does not exist", "check the path") from None
    except (_Damaged, OSError, ValueError) as exc:
        raise _unreadable(src, exc) from exc
    try:
        length = int.from_bytes(buffer[:8], "little")
        metadata, entries = parse_header(buffer[: 8 + min(length, MAX_HEADER_BYTES)], len(buffer))
    except _Damaged as exc:
        buffer.close()
        raise _unreadable(src, exc) from exc
    return SafetensorsFile(src, buffer, metadata, entries)


def read_safetensors(path: str | os.PathLike, verify: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the ``__metadata__`` of a safetensors file, from one mapping (DsnnError if it is damaged,
    or with ``verify`` if it does not match its checksums)."""
    with open_safetensors(path) as file:
        return file.load(verify), dict(file.metadata)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file from one read of its header, without loading tensors (DsnnError
    if it is missing, unreadable or damaged)."""
    src = Path(path)
    try:
        with open(src, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                head += fh.read(min(int.from_bytes(head, "little"), MAX_HEADER_BYTES))
        return parse_header(head, size)[0]
    except FileNotFoundError:
        raise DsnnError(f"{src} does not exist", "check the path") from None
    except (_Damaged, OSError, ValueError) as exc:
        raise _unreadable(src, exc) from exc
