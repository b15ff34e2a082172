"""The DSNN bundle: dense weights + packed keep codes + JSON metadata in one safetensors file.

See ``docs/bundle-format.md`` for the on-disk specification.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import tool_metadata
from ..errors import DsnnError, UsageError
from .checksums import CHECKSUM_KEY, INTEGRITY_NONE, INTEGRITY_RECORDED
from .continuous import keep_masks
from .depth import StackDepth, check_depth_codes, depth_metadata, parse_depth_metadata
from .group_format import StructuredLevels, parse_structured
from .levels import LevelLookups, validate_levels
from .masks import code_bits, pack_codes, packed_size, pruned_count, pruned_per_level, unpack_codes
from .safetensors_io import SafetensorsFile, open_safetensors, write_safetensors
from .scores import block_of

FORMAT_NAME = "dsnn-bundle"
FORMAT_VERSION = "1"
CODE_SUFFIX = ".dsnn_code"
_REQUIRED_KEYS = ("format", "format_version", "levels", "code_bits", "code_suffix", "pruned", "sparsity", "tool")
_JSON_KEYS = ("levels", "pruned", "sparsity", "selection", "source", "tool", "command", "model", "hf_files",
              "pruning", "depth", "depth_calibration",
              "recipe", "evaluation", "training", "structured")


@dataclass
class Bundle(LevelLookups):
    """Dense tensors, their keep codes and metadata. Level ``k`` keeps weights whose code is ``>= k``.

    The level lookups (``all_levels``, ``level_index``, ``resolve_level``, ``is_trained``) come from
    :class:`~dsnn_compress.core.levels.LevelLookups`."""

    tensors: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    levels: tuple[float, ...]
    """Sparse levels (the dense level 0 is implicit)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    integrity: str = INTEGRITY_NONE
    """What loading established about the file's checksums: ``verified``, ``not verified`` (``verify=False``),
    ``no checksums`` (a bundle written before they were recorded, or one made in memory) or ``recorded`` (just
    saved, with the checksums of these tensors)."""
    structured: StructuredLevels | None = None
    """Group sets and group codes of a structured bundle (None: weight granularity)."""
    depth: list[StackDepth] | None = None
    """Layers dropped per level (``core.depth``; None: every level keeps every layer)."""

    @property
    def bits(self) -> int:
        """Bits per weight of the packed codes."""
        return code_bits(len(self.levels))

    @property
    def allocation(self) -> str:
        """``per-layer`` or ``global`` (how the levels were allocated; it also orders continuous levels)."""
        return str(self.metadata.get("allocation") or "per-layer")

    def masks_at(self, level: float | str) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every pruned tensor at ``level``, trained or continuous (``core.continuous``)."""
        return keep_masks(self.tensors, self.codes, self.levels, level, self.allocation)

    def mask(self, name: str, level: float | str) -> torch.Tensor:
        """Boolean keep-mask of tensor ``name`` at ``level`` (any level in [0, largest])."""
        if self.is_trained(level):
            return self.codes[name] >= self.level_index(level)
        return self.masks_at(level)[name]

    def state_dict_at(self, level: float | str) -> dict[str, torch.Tensor]:
        """A plain state dict at ``level`` (a trained level or any value between dense and the largest one):
        every source tensor, pruned weights set to exactly zero."""
        value = self.resolve_level(level)
        masks = None if self.is_trained(value) else self.masks_at(value)
        index = self.level_index(value) if masks is None else -1
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.tensors.items():
            code = self.codes.get(name)
            if code is None or index == 0:
                out[name] = tensor
            else:
                keep = code >= index if masks is None else masks[name]
                out[name] = torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype))
        return out

    def summary(self) -> dict[str, Any]:
        """Achieved sparsity per level (prunable and overall) and per tensor, computed from the codes."""
        return sparsity_summary(self.tensors, self.codes, self.levels)


def sparsity_summary(
    tensors: Mapping[str, torch.Tensor], codes: Mapping[str, torch.Tensor], levels: Sequence[float]
) -> dict[str, Any]:
    """Per-level and per-tensor pruned counts and sparsities."""
    num = len(levels)
    per_tensor: dict[str, dict[str, Any]] = {}
    pruned_totals = [0] * (num + 1)
    for name in sorted(codes):
        counts = pruned_per_level(codes[name], num)
        numel = codes[name].numel()
        per_tensor[name] = {
            "shape": list(codes[name].shape),
            "numel": numel,
            "pruned": counts,
            "sparsity": [round(c / numel, 8) if numel else 0.0 for c in counts],
        }
        pruned_totals = [a + b for a, b in zip(pruned_totals, counts)]
    prunable = sum(v["numel"] for v in per_tensor.values())
    total = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    per_level = []
    for k, level in enumerate((0.0, *levels)):
        per_level.append({
            "level": level,
            "pruned": pruned_totals[k],
            "prunable_sparsity": round(pruned_totals[k] / prunable, 8) if prunable else 0.0,
            "overall_sparsity": round(pruned_totals[k] / total, 8) if total else 0.0,
            "nonzero_params": total - pruned_totals[k],
        })
    return {"prunable_params": prunable, "total_params": total, "levels": per_level, "tensors": per_tensor}


def build_metadata(bundle: Bundle) -> dict[str, str]:
    """The ``__metadata__`` string map of ``bundle`` (JSON values), with fresh sparsity statistics."""
    summary = bundle.summary()
    meta: dict[str, Any] = {k: v for k, v in bundle.metadata.items() if v is not None}
    meta.update({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "levels": list(bundle.levels),
        "code_bits": str(bundle.bits),
        "code_suffix": CODE_SUFFIX,
        "pruned": {name: {"shape": v["shape"], "pruned": v["pruned"]} for name, v in summary["tensors"].items()},
        "sparsity": {k: v for k, v in summary.items() if k != "tensors"},
    })
    meta.setdefault("tool", tool_metadata())
    if bundle.structured is not None:
        meta.update({"granularity": "structured", "structured": bundle.structured.to_metadata()})
    if bundle.depth:
        meta["depth"] = depth_metadata(bundle.depth)
    out: dict[str, str] = {}
    for key, value in meta.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return out


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write ``bundle`` atomically to ``path`` (temp file, fsync, rename). Returns the path."""
    out = Path(path)
    for name, code in bundle.codes.items():
        if name not in bundle.tensors:
            raise DsnnError(f"code for {name} has no tensor")
        if tuple(code.shape) != tuple(bundle.tensors[name].shape):
            shape = tuple(bundle.tensors[name].shape)
            raise DsnnError(f"code for {name} has shape {tuple(code.shape)}, tensor {shape}")
    clash = [n for n in bundle.tensors if n.endswith(CODE_SUFFIX)]
    if clash:
        raise DsnnError(f"source tensor {clash[0]} ends in {CODE_SUFFIX}, which the bundle format reserves")
    stored: dict[str, torch.Tensor] = dict(bundle.tensors)
    for name, code in bundle.codes.items():
        stored[name + CODE_SUFFIX] = pack_codes(code, bundle.bits)
    write_safetensors(out, stored, build_metadata(bundle))
    bundle.path = out
    bundle.integrity = INTEGRITY_RECORDED
    return out


def _parse_metadata(raw: Mapping[str, str], path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _JSON_KEYS:
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                raise DsnnError(f"{path}: metadata {key!r} is not valid JSON", "the bundle is corrupt") from None
        else:
            meta[key] = value
    return meta


def _mid_schedule(meta: Mapping[str, Any]) -> bool:
    """True for a checkpoint written while a gradual schedule was still ramping the sparsities up to the declared
    levels (its recipe enables the schedule and its training record stops at or before ``end_step``)."""
    recipe, training = meta.get("recipe"), meta.get("training")
    if not isinstance(recipe, dict) or not isinstance(training, dict):
        return False
    schedule = recipe.get("schedule")
    steps = training.get("steps")
    return (isinstance(schedule, dict) and bool(schedule.get("enabled")) and isinstance(steps, int)
            and isinstance(schedule.get("end_step"), int) and steps <= schedule["end_step"])


def _check_declared_levels(src: Path, levels: Sequence[float], counts: Mapping[str, list[int]],
                           shapes: Mapping[str, Sequence[int]], meta: Mapping[str, Any]) -> None:
    """The codes must hold the sparsities the metadata declares: every tensor at each level (per-layer allocation;
    per-row: every row), at its block's sparsity when a per-block profile is recorded (``pruning.blocks``), or all
    pruned tensors together (global allocation) prune exactly ``round(level * size)`` weights."""
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    total = sum(sizes.values())
    pruning = meta.get("pruning") if isinstance(meta.get("pruning"), dict) else {}
    per_row = meta.get("allocation") == "per-row"
    profile = pruning.get("blocks") if isinstance(pruning.get("blocks"), dict) else None

    def expected(name: str, k: int, level: float) -> int | None:
        if profile is not None:
            values = profile.get(block_of(name))
            if not isinstance(values, list) or len(values) != len(levels) or not isinstance(values[k - 1],
                                                                                           (int, float)):
                return None
            level = float(values[k - 1])
        if per_row:
            rows = int(shapes[name][0]) if len(shapes[name]) >= 2 else 1
            return rows * pruned_count(level, sizes[name] // max(rows, 1))
        return pruned_count(level, sizes[name])

    for k, level in enumerate(levels, start=1):
        per_tensor = all(counts[n][k] == expected(n, k, level) for n in counts)
        overall = sum(counts[n][k] for n in counts) == pruned_count(level, total)
        if not (per_tensor or overall):
            achieved = sum(counts[n][k] for n in counts) / max(total, 1)
            raise DsnnError(f"{src}: the metadata declares level {level:g} but its codes prune {100 * achieved:.2f} % "
                            "of the pruned tensors", "the bundle is corrupt (or was edited); re-create it")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and validate a bundle: format/version, levels, code bits, shapes, code ranges, recorded counts; with
    ``verify`` (the default) also its checksums, when it has them (a bundle written before them loads unverified).

    The file is mapped once and everything comes from that mapping, so a concurrent ``os.replace`` of ``path``
    yields the old bundle or the new one, never a mixture.
    """
    src = Path(path)
    if not src.is_file():
        raise DsnnError(f"bundle {src} does not exist", "check the path, or create one with `dsnn prune`")
    with open_safetensors(src) as file:
        return bundle_from_file(file, verify)


def bundle_from_file(file: SafetensorsFile, verify: bool = True) -> Bundle:
    """The validated bundle held by an opened safetensors ``file`` (see :func:`load_bundle`)."""
    src = file.path
    raw_meta = file.metadata
    if verify:
        file.verify_metadata()
    if raw_meta.get("format") != FORMAT_NAME:
        raise DsnnError(
            f"{src} is not a DSNN bundle (no format={FORMAT_NAME} metadata)",
            "create a bundle with `dsnn prune CHECKPOINT --levels ... -o BUNDLE`",
        )
    missing = [k for k in _REQUIRED_KEYS if k not in raw_meta]
    if missing:
        raise DsnnError(f"{src}: bundle metadata lacks {missing[0]!r}", "the bundle is corrupt; re-create it")
    if raw_meta["format_version"] != FORMAT_VERSION:
        raise DsnnError(
            f"{src} has bundle format version {raw_meta['format_version']}, this dsnn reads version {FORMAT_VERSION}",
            "upgrade dsnn-compress or re-create the bundle",
        )
    meta = _parse_metadata(raw_meta, src)
    if raw_meta["code_suffix"] != CODE_SUFFIX:
        raise DsnnError(f"{src}: code_suffix {raw_meta['code_suffix']!r} is not {CODE_SUFFIX!r}",
                        "the bundle is corrupt")
    for key in ("source", "tool", "sparsity", "selection", "model"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise DsnnError(f"{src}: metadata {key!r} is not a JSON object", "the bundle is corrupt")
    try:
        levels = validate_levels([float(v) for v in meta["levels"]])
    except (TypeError, ValueError, UsageError) as exc:
        raise DsnnError(f"{src}: invalid levels in metadata ({exc})", "the bundle is corrupt") from None
    bits = code_bits(len(levels))
    if raw_meta["code_bits"] != str(bits):
        raise DsnnError(f"{src}: code_bits {raw_meta['code_bits']} does not fit {len(levels)} levels")
    pruned = meta["pruned"]
    if not isinstance(pruned, dict) or not pruned:
        raise DsnnError(f"{src}: bundle lists no pruned tensors", "the bundle is corrupt")
    stored = file.load(verify)
    tensors = {n: t for n, t in stored.items() if not n.endswith(CODE_SUFFIX)}
    codes: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {}
    for name, info in pruned.items():
        if not isinstance(info, dict):
            raise DsnnError(f"{src}: metadata of pruned tensor {name} is not a JSON object", "the bundle is corrupt")
        code_name = name + CODE_SUFFIX
        if name not in tensors or code_name not in stored:
            raise DsnnError(f"{src}: pruned tensor {name} or its codes are missing", "the bundle is corrupt")
        shape = tuple(tensors[name].shape)
        if list(shape) != list(info.get("shape", [])):
            raise DsnnError(f"{src}: {name} has shape {list(shape)} but metadata says {info.get('shape')}")
        packed = stored[code_name]
        if packed.numel() != packed_size(math.prod(shape), bits):
            raise DsnnError(f"{src}: codes of {name} have the wrong size", "the bundle is corrupt")
        code = unpack_codes(packed, bits, shape)
        if code.numel() and int(code.max()) > len(levels):
            raise DsnnError(f"{src}: codes of {name} exceed {len(levels)} levels", "the bundle is corrupt")
        if not torch.equal(pack_codes(code, bits), packed):
            raise DsnnError(f"{src}: codes of {name} have stray padding bits", "the bundle is corrupt")
        counts[name] = pruned_per_level(code, len(levels))
        if counts[name] != info.get("pruned"):
            raise DsnnError(f"{src}: pruned counts of {name} do not match its codes", "the bundle is corrupt")
        codes[name] = code
    structured = None
    depth = parse_depth_metadata(src, meta["depth"], levels) if "depth" in meta else None
    if depth:
        check_depth_codes(src, depth, tensors, codes)
    if meta.get("granularity", "weight") == "structured":
        structured = parse_structured(src, meta.get("structured"), tensors, codes, levels,
                                      str(meta.get("allocation", "per-layer")), not _mid_schedule(meta), depth)
    elif not _mid_schedule(meta):
        _check_declared_levels(src, levels, counts, {n: tuple(c.shape) for n, c in codes.items()}, meta)
    stray = [n for n in stored if n.endswith(CODE_SUFFIX) and n[: -len(CODE_SUFFIX)] not in pruned]
    if stray:
        raise DsnnError(f"{src}: code tensor {stray[0]} belongs to no listed tensor", "the bundle is corrupt")
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "levels", "code_bits",
                                                        "code_suffix", "pruned", "sparsity", "granularity",
                                                        "structured", "depth", CHECKSUM_KEY)}
    return Bundle(tensors=tensors, codes=codes, levels=levels, metadata=keep, path=src, integrity=file.integrity,
                  structured=structured, depth=depth)
