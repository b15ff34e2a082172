"""Per-tensor checksums of the safetensors files dsnn writes (bundles, checkpoints, exported state dicts).

Every file written by :func:`~dsnn_compress.core.safetensors_io.write_safetensors` carries the metadata key
``dsnn_checksums``: a JSON object ``{"algorithm": "xxh3-64", "metadata": HEX, "tensors": {NAME: HEX, ...}}``.

* A tensor's digest is XXH3-64 (seed 0) of the ASCII text ``DTYPE:SHAPE:`` followed by the tensor's stored bytes
  (the ``data_offsets`` range of the file: little-endian, row-major), where ``DTYPE`` is the safetensors dtype code
  (``F32``, ``F16``, ``U8``, ...) and ``SHAPE`` the dimensions joined by commas (empty for a scalar):
  ``F16:4,8:`` + 64 bytes.
* The metadata digest is XXH3-64 of every other ``__metadata__`` entry, in code-point order of the keys, each
  encoded as ``len(key) key len(value) value`` (UTF-8 bytes, lengths as 8-byte little-endian integers).
* ``HEX`` is the 64-bit value as 16 lowercase hex digits (``xxhash.xxh3_64_hexdigest``).

XXH3 is not cryptographic: it detects damage (bit flips, truncation, a torn copy), not a deliberate forgery, which
would simply recompute it. ``docs/bundle-format.md`` has a reference verifier; ``benchmarks/checksum_cost.py``
measures the cost against sha256, blake2b and crc32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from ..errors import DsnnError

CHECKSUM_KEY = "dsnn_checksums"
ALGORITHM = "xxh3-64"

INTEGRITY_VERIFIED = "verified"
INTEGRITY_SKIPPED = "not verified"
INTEGRITY_NONE = "no checksums"
INTEGRITY_RECORDED = "recorded"
"""A bundle just written: its file carries the checksums of exactly these tensors."""


def tensor_digest(dtype: str, shape: Sequence[int], data: Any) -> str:
    """Digest of one stored tensor: ``dtype`` code, ``shape`` and its raw bytes (any buffer: bytes, numpy, mmap)."""
    hasher = xxhash.xxh3_64(f"{dtype}:{','.join(str(int(d)) for d in shape)}:".encode("ascii"))
    hasher.update(data)
    return hasher.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """Digest of the ``__metadata__`` map without the checksum entry itself."""
    hasher = xxhash.xxh3_64()
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        for text in (key, metadata[key]):
            raw = text.encode("utf-8")
            hasher.update(len(raw).to_bytes(8, "little"))
            hasher.update(raw)
    return hasher.hexdigest()


def checksum_entry(tensor_digests: Mapping[str, str], metadata: Mapping[str, str]) -> str:
    """The ``dsnn_checksums`` value for a file holding tensors with ``tensor_digests`` and ``metadata``."""
    record = {"algorithm": ALGORITHM, "metadata": metadata_digest(metadata), "tensors": dict(tensor_digests)}
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Checksums:
    """A parsed ``dsnn_checksums`` entry."""

    metadata: str
    tensors: dict[str, str]


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def parse_checksums(where: str, metadata: Mapping[str, str]) -> Checksums | None:
    """The checksums recorded in ``metadata`` (None when it has none); DsnnError when the entry is malformed."""
    text = metadata.get(CHECKSUM_KEY)
    if text is None:
        return None
    hint = "the file is corrupt; re-copy or re-create it (--no-verify skips the check)"
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DsnnError(f"{where}: metadata {CHECKSUM_KEY!r} is not valid JSON", hint) from None
    if not isinstance(record, dict):
        raise DsnnError(f"{where}: metadata {CHECKSUM_KEY!r} is not a JSON object", hint)
    if record.get("algorithm") != ALGORITHM:
        raise DsnnError(f"{where}: checksum algorithm {record.get('algorithm')!r} is not {ALGORITHM!r}",
                        "this dsnn cannot verify it; upgrade dsnn-compress or pass --no-verify")
    tensors = record.get("tensors")
    if (not _is_digest(record.get("metadata")) or not isinstance(tensors, dict)
            or not all(isinstance(k, str) and _is_digest(v) for k, v in tensors.items())):
        raise DsnnError(f"{where}: metadata {CHECKSUM_KEY!r} is malformed", hint)
    return Checksums(record["metadata"], dict(tensors))


_DAMAGED_HINT = ("the file was damaged or changed after it was written; re-copy or re-create it "
                 "(--no-verify skips the check)")


def corrupt_error(where: str, names: Sequence[str]) -> DsnnError:
    """The error for data that does not match its checksums, naming the damaged tensors (``[]``: the metadata)."""
    if not names:
        return DsnnError(f"{where} is corrupt: its metadata does not match its checksum", _DAMAGED_HINT)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    what = "tensor" if len(names) == 1 else "tensors"
    return DsnnError(f"{where} is corrupt: checksum mismatch in {what} {shown}", _DAMAGED_HINT)


def check_metadata(where: str, checksums: Checksums, metadata: Mapping[str, str]) -> None:
    """Raise when ``metadata`` does not match its recorded digest."""
    if metadata_digest(metadata) != checksums.metadata:
        raise corrupt_error(where, [])


def check_names(where: str, checksums: Checksums, names: Sequence[str]) -> None:
    """Raise when the stored tensors are not exactly the ones the checksums list."""
    missing = sorted(set(checksums.tensors) - set(names))
    extra = sorted(set(names) - set(checksums.tensors))
    if missing or extra:
        detail = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which its checksums do not list"
        raise DsnnError(f"{where} is corrupt: it {detail}", _DAMAGED_HINT)
