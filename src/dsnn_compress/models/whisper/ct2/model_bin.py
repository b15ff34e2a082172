"""CTranslate2's ``model.bin`` file, read and written exactly as ctranslate2's ``ModelSpec`` serialises it.

Layout (little-endian): u32 binary version, str spec name, u32 spec revision, u32 variable count, then per variable
(sorted by name) str name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, raw data; then u32 alias count and
(str alias, str target) pairs; nothing after. A str is a u16 length counting a trailing NUL, the UTF-8 bytes and the
NUL. Spec scalars are rank-0 variables. Only Whisper models (binary version 6, spec ``WhisperSpec`` revision 3) are
read; any other file, or a damaged one, is one :class:`DsnnError` naming the file and what is wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ....errors import DsnnError

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
CONVERT_HINT = "convert the model with ctranslate2's TransformersConverter (float16 or float32, not quantized)"
"""What to do about a model.bin that is not one of the Whisper models the converter writes."""


class DType(NamedTuple):
    """One of CTranslate2's ``DataType`` values."""

    name: str
    torch: torch.dtype
    numpy: str | None
    """numpy's little-endian dtype; None for bfloat16, which numpy lacks (its bits travel as int16)."""


DTYPES: dict[int, DType] = {
    0: DType("float32", torch.float32, "<f4"),
    1: DType("int8", torch.int8, "i1"),
    2: DType("int16", torch.int16, "<i2"),
    3: DType("int32", torch.int32, "<i4"),
    4: DType("float16", torch.float16, "<f2"),
    5: DType("bfloat16", torch.bfloat16, None),
}
"""dtype id (its place in CTranslate2's ``DataType``) -> the dtype."""
DTYPE_IDS = {dtype.torch: dtype_id for dtype_id, dtype in DTYPES.items()}
"""torch dtype -> CTranslate2 dtype id."""
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The weight dtypes of a Whisper model that is not quantized, by name."""


class _Reader:
    """Bounds-checked little-endian reads over the bytes of a ``model.bin``, front to back."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = memoryview(data)
        self.position = 0
        self.path = path

    def take(self, count: int, what: str) -> memoryview:
        """The next ``count`` bytes; ``what`` names them in the error when the file ends first."""
        if self.position + count > len(self.data):
            raise DsnnError(f"{self.path} is truncated: {what} needs {count} bytes at offset {self.position}, "
                            f"the file has {len(self.data)}", "copy the file again")
        self.position += count
        return self.data[self.position - count: self.position]

    def number(self, fmt: str, what: str) -> int:
        """The next unsigned integer in ``struct`` format ``fmt`` (``B``, ``H`` or ``I``)."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        """The next str (u16 length, UTF-8 bytes, NUL)."""
        raw = bytes(self.take(self.number("H", f"the length of {what}"), what))
        if not raw or raw[-1] != 0:
            raise DsnnError(f"{self.path}: {what} at offset {self.position - len(raw)} is not a NUL-terminated string",
                            "this is not a CTranslate2 model.bin")
        return raw[:-1].decode("utf-8", errors="replace")


def peek_ct2_header(path: Path) -> tuple[int, str] | None:
    """(binary version, spec name) when ``path`` starts like a CTranslate2 ``model.bin`` (any version or spec, so
    that an unsupported one gets a clear error rather than being taken for something else), else None. Cheap."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(260)
        version, length = struct.unpack_from("<IH", head)
    except (OSError, struct.error):
        return None
    name = head[6: 6 + length]
    if not (2 <= version <= 64 and 2 <= length == len(name) and name[-1] == 0 and name[:-1].isascii()):
        return None
    spec = name[:-1].decode("ascii")
    return (version, spec) if spec.isprintable() else None


def _read_header(reader: _Reader) -> None:
    """Check the binary version, the spec name and its revision."""
    path = reader.path
    version = reader.number("I", "the binary version")
    if version != BINARY_VERSION:
        raise DsnnError(f"{path}: CTranslate2 binary version {version} is not supported (only {BINARY_VERSION})",
                        CONVERT_HINT)
    spec = reader.string("the spec name")
    if spec != SPEC_NAME:
        raise DsnnError(f"{path} holds a CTranslate2 {spec!r} model; only {SPEC_NAME} (Whisper) is supported",
                        "pass a faster-whisper model directory")
    revision = reader.number("I", "the spec revision")
    if revision != SPEC_REVISION:
        raise DsnnError(f"{path}: {SPEC_NAME} revision {revision} is not supported (only {SPEC_REVISION})",
                        CONVERT_HINT)


def _read_variable(reader: _Reader, index: int, variables: dict[str, torch.Tensor]) -> None:
    """Read variable number ``index`` into ``variables`` (a tensor of the file's dtype)."""
    path = reader.path
    name = reader.string(f"the name of variable {index}")
    rank = reader.number("B", f"the rank of {name}")
    shape = tuple(reader.number("I", f"a dimension of {name}") for _ in range(rank))
    dtype_id = reader.number("B", f"the dtype of {name}")
    if dtype_id not in DTYPES:
        raise DsnnError(f"{path}: {name} has an unsupported dtype id {dtype_id}", CONVERT_HINT)
    dtype = DTYPES[dtype_id]
    byte_count = reader.number("I", f"the byte count of {name}")
    expected = int(np.prod(shape)) * dtype.torch.itemsize
    if byte_count != expected:
        raise DsnnError(f"{path}: {name} {list(shape)} {dtype.name} declares {byte_count} bytes, expected {expected}",
                        "the file is damaged")
    if name in variables:
        raise DsnnError(f"{path}: variable {name} is stored twice", "the file is damaged")
    data = reader.take(byte_count, f"the data of {name}")
    array = np.frombuffer(data, dtype=dtype.numpy or "<i2").reshape(shape)
    tensor = torch.from_numpy(array.copy())
    variables[name] = tensor.view(torch.bfloat16) if dtype.numpy is None else tensor


def read_model_bin(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The variables (rank-0 tensors for spec scalars, each in the file's dtype) and aliases of a Whisper model.bin."""
    reader = _Reader(Path(path).read_bytes(), Path(path))
    _read_header(reader)
    variables: dict[str, torch.Tensor] = {}
    for index in range(reader.number("I", "the variable count")):
        _read_variable(reader, index, variables)
    aliases: dict[str, str] = {}
    for _ in range(reader.number("I", "the alias count")):
        alias = reader.string("an alias name")
        target = reader.string(f"the target of alias {alias}")
        aliases[alias] = target
        if target not in variables:
            raise DsnnError(f"{path}: alias {alias} points at a missing variable", "the file is damaged")
    trailing = len(reader.data) - reader.position
    if trailing:
        raise DsnnError(f"{path} has {trailing} trailing bytes after the model (offset {reader.position})",
                        "the file is damaged or not a CTranslate2 model.bin")
    return variables, aliases


def _string_bytes(text: str) -> bytes:
    """A str as model.bin stores it."""
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable_bytes(name: str, tensor: torch.Tensor) -> bytes:
    """One variable as model.bin stores it: name, rank, dims, dtype id, byte count, little-endian data."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in DTYPE_IDS:
        raise DsnnError(f"{name} has dtype {tensor.dtype}, which CTranslate2 cannot store", "use float32")
    array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    rank = tensor.dim()
    return b"".join([
        _string_bytes(name),
        struct.pack(f"<B{rank}I", rank, *tensor.shape),
        struct.pack("<BI", DTYPE_IDS[tensor.dtype], len(data)),
        data,
    ])


def write_model_bin(path: Path, variables: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    """Write ``model.bin`` exactly as ctranslate2's ``ModelSpec`` serialises it (variables and aliases sorted)."""
    chunks = [
        struct.pack("<I", BINARY_VERSION),
        _string_bytes(SPEC_NAME),
        struct.pack("<II", SPEC_REVISION, len(variables)),
    ]
    for name in sorted(variables):
        chunks.append(_variable_bytes(name, variables[name]))
    chunks.append(struct.pack("<I", len(aliases)))
    for alias in sorted(aliases):
        chunks.append(_string_bytes(alias))
        chunks.append(_string_bytes(aliases[alias]))
    Path(path).write_bytes(b"".join(chunks))
