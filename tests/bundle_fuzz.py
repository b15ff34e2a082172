"""A seeded bundle fuzzer: mutations of a valid DSNN bundle file and the property every mutant must satisfy.

Shared by ``tests/test_fuzz_bundles.py`` (a few hundred mutants in CI) and ``benchmarks/fuzz_bundles.py``
(thousands, counts per outcome). The property, for every mutant: ``load_bundle`` (checksums verified, the default)
and the CLI's way in (``open_source(...).require_bundle()``) either reject it with :class:`DsnnError`, or load a
bundle that is valid and equal to the original (same levels, same tensors bit for bit, same codes) - never another
exception type, never a hang. Independently, whenever dsnn's safetensors parser accepts a mutant, the official
``safetensors`` library must accept it too and hold the same bytes for every tensor.

Mutations: bit flips in the header length, the header JSON and the data (any tensor, or a code tensor), truncation,
appended bytes, a zeroed range (a torn write), swapped tensor data, header entries edited (dtype, shape,
offsets), metadata values replaced by other JSON types or edited values (levels, counts, shapes, code bits,
version), code values changed, and the checksum entry removed. The ``*-rechecked`` kinds also recompute the
checksums after the edit, as a tool that rewrites the file would, so that only the structural validation stands
between them and a wrong model.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch

from dsnn_compress.core.bundle import Bundle, load_bundle
from dsnn_compress.core.checksums import CHECKSUM_KEY, checksum_entry, tensor_digest
from dsnn_compress.core.masks import code_bits, pack_codes, unpack_codes
from dsnn_compress.core.safetensors_io import open_safetensors
from dsnn_compress.errors import DsnnError
from dsnn_compress.sources.opener import open_source

OK_OUTCOMES = ("rejected", "loaded-equal")


# ------------------------------------------------------------------------------------------------ the file layout


@dataclass
class Layout:
    """A safetensors file split into header entries, metadata and data (offsets relative to the data)."""

    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Layout:
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        metadata = header.pop("__metadata__", {})
        return cls(header, metadata, raw[8 + length :])

    def build(self) -> bytes:
        header = dict(self.entries)
        header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob + self.data

    def tensor_bytes(self, name: str) -> bytes:
        begin, end = self.entries[name]["data_offsets"]
        return self.data[begin:end]

    def set_tensor_bytes(self, name: str, value: bytes) -> None:
        begin, end = self.entries[name]["data_offsets"]
        assert len(value) == end - begin
        self.data = self.data[:begin] + value + self.data[end:]

    def recheck(self) -> None:
        """Recompute the checksum entry for the current tensors and metadata (as a rewriting tool would)."""
        digests = {}
        for name, info in self.entries.items():
            with contextlib.suppress(Exception):
                digests[name] = tensor_digest(info["dtype"], info["shape"], self.tensor_bytes(name))
        meta = {k: v for k, v in self.metadata.items() if k != CHECKSUM_KEY}
        self.metadata[CHECKSUM_KEY] = checksum_entry(digests, meta)


# ------------------------------------------------------------------------------------------------------ mutations


def _flip(raw: bytes, lo: int, hi: int, rng: random.Random) -> tuple[bytes, str]:
    position = rng.randrange(lo, hi)
    bit = rng.randrange(8)
    out = bytearray(raw)
    out[position] ^= 1 << bit
    return bytes(out), f"byte {position} bit {bit}"


def _random_json(rng: random.Random) -> Any:
    return rng.choice([42, -1, 0.5, float("1e308"), "x", "", None, True, [], [1, 2], {}, {"a": 1}, [[0.5]],
                       {"shape": "x"}, [0.5, "0.7"], 2**70])


def _code_names(layout: Layout) -> list[str]:
    return sorted(n for n in layout.entries if n.endswith(".dsnn_code"))


def _meta_value_edit(layout: Layout, rng: random.Random) -> str:
    meta = layout.metadata
    choice = rng.choice(["levels", "pruned-count", "pruned-shape", "code_bits", "format_version", "sparsity",
                         "format", "code_suffix", "allocation"])
    if choice == "levels":
        levels = json.loads(meta["levels"])
        i = rng.randrange(len(levels))
        levels[i] = rng.choice([levels[i] + 0.05, levels[i] - 0.05, 0.0, 1.0, -0.5, levels[i]])
        if rng.random() < 0.3:
            levels = levels[:-1] if rng.random() < 0.5 else [*levels, 0.95]
        meta["levels"] = json.dumps(levels)
    elif choice in ("pruned-count", "pruned-shape"):
        pruned = json.loads(meta["pruned"])
        name = rng.choice(sorted(pruned))
        key = "pruned" if choice == "pruned-count" else "shape"
        values = pruned[name][key]
        if values:
            i = rng.randrange(len(values))
            values[i] += rng.choice([-1, 1, 100])
        meta["pruned"] = json.dumps(pruned)
    elif choice == "code_bits":
        meta["code_bits"] = str(rng.choice([0, 1, 3, 8, -2]))
    elif choice == "format_version":
        meta["format_version"] = rng.choice(["0", "2", "1.0", ""])
    elif choice == "sparsity":
        sparsity = json.loads(meta["sparsity"])
        sparsity["total_params"] = rng.choice([0, -5, 10**12, "many"])
        meta["sparsity"] = json.dumps(sparsity)
    else:
        meta[choice] = rng.choice(["", "dsnn-bundle", ".dsnn_code", "global", "per-layer", "other"])
    return choice


def _code_edit(layout: Layout, rng: random.Random, rechecked: bool) -> str:
    """Change code values. With ``rechecked`` exactly one code changes (to another value), which always changes
    the pruned counts the metadata records; several changes could keep the counts, and with recomputed checksums
    that is just a different valid bundle (another mask with the same sparsities)."""
    name = rng.choice(_code_names(layout))
    dense = name[: -len(".dsnn_code")]
    shape = layout.entries[dense]["shape"]
    levels = json.loads(layout.metadata["levels"])
    bits = code_bits(len(levels))
    packed = torch.frombuffer(bytearray(layout.tensor_bytes(name)), dtype=torch.uint8)
    codes = unpack_codes(packed, bits, tuple(shape)).reshape(-1).clone()
    for _ in range(1 if rechecked else rng.randint(1, 3)):
        position = rng.randrange(codes.numel())
        codes[position] = rng.choice([v for v in range(1 << bits) if not rechecked or v != int(codes[position])])
    layout.set_tensor_bytes(name, bytes(pack_codes(codes.reshape(shape), bits).numpy().tobytes()))
    return name


def _entry_edit(layout: Layout, rng: random.Random, rechecked: bool) -> str:
    """Edit a header entry. With ``rechecked`` (checksums recomputed afterwards) only edits that contradict another
    part of the file: offsets, and shapes of pruned tensors and their codes (which the metadata records); a
    consistent change of another tensor's dtype or shape would just be a different valid bundle."""
    if rechecked:
        field = rng.choice(["shape", "offsets"])
        pruned = json.loads(layout.metadata["pruned"])
        names = sorted(layout.entries) if field == "offsets" else sorted(
            n for n in layout.entries if n in pruned or n.endswith(".dsnn_code"))
    else:
        field = rng.choice(["dtype", "shape", "offsets"])
        names = sorted(layout.entries)
    name = rng.choice(names)
    info = layout.entries[name]
    if field == "dtype":
        info["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "Q4", 7])
    elif field == "shape":
        info["shape"] = rng.choice([[], [0], list(reversed(info["shape"])), [math.prod(info["shape"])],
                                    [*info["shape"], 1], [-1], [1.5]])
    else:
        begin, end = info["data_offsets"]
        info["data_offsets"] = rng.choice([[begin, end + 1], [begin + 1, end], [end, begin], [0, end - begin],
                                          [begin, end, 0]])
    return f"{name}.{field}"


def mutate(original: bytes, rng: random.Random) -> tuple[str, bytes, str]:
    """One mutant of ``original``: ``(kind, bytes, detail)``."""
    layout = Layout.parse(original)
    data_start = len(original) - len(layout.data)
    kind = rng.choice(KINDS)
    if kind == "flip-length":
        raw, detail = _flip(original, 0, 8, rng)
    elif kind == "flip-header":
        raw, detail = _flip(original, 8, data_start, rng)
    elif kind == "flip-data":
        raw, detail = _flip(original, data_start, len(original), rng)
    elif kind == "flip-code":
        name = rng.choice(_code_names(layout))
        begin, end = layout.entries[name]["data_offsets"]
        raw, detail = _flip(original, data_start + begin, data_start + end, rng)
    elif kind == "truncate":
        cut = rng.randrange(len(original))
        raw, detail = original[:cut], f"at {cut}"
    elif kind == "append":
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        raw, detail = original + extra, f"{len(extra)} bytes"
    elif kind == "zero-range":
        start = rng.randrange(len(original))
        size = rng.randint(1, 4096)
        raw = original[:start] + bytes(min(size, len(original) - start)) + original[start + size :]
        detail = f"{size} bytes at {start}"
    elif kind == "swap-tensors":
        by_size: dict[int, list[str]] = {}
        for name in layout.entries:
            by_size.setdefault(len(layout.tensor_bytes(name)), []).append(name)
        pairs = [names for names in by_size.values() if len(names) > 1]
        a, b = rng.sample(rng.choice(pairs), 2) if pairs else (None, None)
        if a is not None:
            first, second = layout.tensor_bytes(a), layout.tensor_bytes(b)
            layout.set_tensor_bytes(a, second)
            layout.set_tensor_bytes(b, first)
        raw, detail = layout.build(), f"{a} <-> {b}"
    elif kind in ("entry-edit", "entry-edit-rechecked"):
        detail = _entry_edit(layout, rng, kind.endswith("rechecked"))
        if kind.endswith("rechecked"):
            layout.recheck()
        raw = layout.build()
    elif kind in ("meta-type", "meta-type-rechecked"):
        key = rng.choice(sorted(k for k in layout.metadata if k != CHECKSUM_KEY))
        layout.metadata[key] = json.dumps(_random_json(rng))
        if kind.endswith("rechecked"):
            layout.recheck()
        raw, detail = layout.build(), key
    elif kind in ("meta-value", "meta-value-rechecked"):
        detail = _meta_value_edit(layout, rng)
        if kind.endswith("rechecked"):
            layout.recheck()
        raw = layout.build()
    elif kind in ("code-values", "code-values-rechecked"):
        detail = _code_edit(layout, rng, kind.endswith("rechecked"))
        if kind.endswith("rechecked"):
            layout.recheck()
        raw = layout.build()
    else:  # drop-checksums: an old-style bundle, which must load as it is
        del layout.metadata[CHECKSUM_KEY]
        raw, detail = layout.build(), ""
    return kind, raw, detail


KINDS = ("flip-length", "flip-header", "flip-data", "flip-code", "truncate", "append", "zero-range", "swap-tensors",
         "entry-edit", "entry-edit-rechecked", "meta-type", "meta-type-rechecked", "meta-value",
         "meta-value-rechecked", "code-values", "code-values-rechecked", "drop-checksums")


# ------------------------------------------------------------------------------------------------- the property


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (SIGALRM; main thread of a Unix process)."""
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def same_bundle(bundle: Bundle, reference: Bundle) -> bool:
    """Levels, tensors (dtype, shape, bits) and codes equal."""
    if bundle.levels != reference.levels or sorted(bundle.tensors) != sorted(reference.tensors):
        return False
    if sorted(bundle.codes) != sorted(reference.codes):
        return False
    for name, tensor in reference.tensors.items():
        other = bundle.tensors[name]
        if other.dtype != tensor.dtype or other.shape != tensor.shape:
            return False
        if not torch.equal(other.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)):
            return False
    return all(torch.equal(bundle.codes[n], reference.codes[n]) for n in reference.codes)


def valid_bundle(bundle: Bundle) -> bool:
    """Every level can be materialised and the codes stay within the levels."""
    for name, code in bundle.codes.items():
        if code.shape != bundle.tensors[name].shape or (code.numel() and int(code.max()) > len(bundle.levels)):
            return False
    for level in bundle.all_levels:
        bundle.state_dict_at(level)
    bundle.summary()
    return True


def _outcome(load: Callable[[], Bundle], reference: Bundle, seconds: float) -> str:
    try:
        with time_limit(seconds):
            bundle = load()
            ok = valid_bundle(bundle) and same_bundle(bundle, reference)
    except DsnnError:
        return "rejected"
    except TimeoutError:
        return "hang"
    except Exception as exc:  # noqa: BLE001 - the point is to catch every other type
        return f"crash:{type(exc).__name__}: {str(exc)[:120]}"
    return "loaded-equal" if ok else "loaded-different"


def parser_agrees(path: Path) -> bool:
    """Where dsnn's safetensors parser accepts the file, the official library accepts it with the same bytes."""
    try:
        with open_safetensors(path) as file:
            mine = {name: bytes(t.reshape(-1).view(torch.uint8).numpy()) for name, t in file.load(False).items()}
    except DsnnError:
        return True
    try:
        official = {name: bytes(info["data"]) for name, info in safetensors.deserialize(path.read_bytes())}
    except Exception:  # noqa: BLE001 - SafetensorError and whatever else it raises: a disagreement
        return False
    return official == mine


def check_mutant(path: Path, reference: Bundle, seconds: float = 20.0) -> str:
    """The outcome of one mutant file: ``rejected``, ``loaded-equal`` (both fine), or a failure
    (``loaded-different``, ``hang``, ``crash:TYPE``, ``paths-disagree``, ``parser-disagrees``)."""
    direct = _outcome(lambda: load_bundle(path), reference, seconds)
    via_cli = _outcome(lambda: open_source(path, role="bundle").require_bundle(), reference, seconds)
    if direct != via_cli:
        return f"paths-disagree: load_bundle {direct}, open_source {via_cli}"
    if not parser_agrees(path):
        return "parser-disagrees"
    return direct
