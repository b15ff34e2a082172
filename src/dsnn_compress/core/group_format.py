"""Structured bundles: the ``structured`` metadata entry (group sets + group keep codes), its checks, and turning
group codes into a bundle's weight codes in prefix order (``docs/bundle-format.md``, ``docs/structured.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DsnnError
from .depth import StackDepth, apply_depth
from .groups import (
    GroupSpec,
    expand_codes,
    is_prefix_ordered,
    kept_counts,
    permute_codes,
    permute_groups,
    prefix_orders,
    structured_pruned_count,
)

STRUCTURED_VERSION = 1


@dataclass
class StructuredLevels:
    """The group sets of a structured bundle and their group keep codes (``codes[name]``: uint8 ``[count]``)."""

    specs: list[GroupSpec]
    codes: dict[str, torch.Tensor]
    num_levels: int

    def kept(self, level_index: int) -> dict[str, int]:
        """Groups alive per set at ``level_index``."""
        return {s.name: int((self.codes[s.name] >= level_index).sum()) for s in self.specs}

    def prefix_ordered(self) -> bool:
        """True when every level keeps a prefix of every set (so it can run on views)."""
        return all(is_prefix_ordered(c) for c in self.codes.values())

    def to_metadata(self) -> dict[str, Any]:
        """The JSON value of the bundle's ``structured`` key."""
        groups = []
        for spec in self.specs:
            codes = self.codes[spec.name]
            groups.append({**spec.to_json(), "codes": [int(c) for c in codes.tolist()],
                           "kept": kept_counts(codes, self.num_levels)})
        return {"version": STRUCTURED_VERSION, "score": "rms", "groups": groups}


def structured_bundle_parts(specs: Sequence[GroupSpec], tensors: Mapping[str, torch.Tensor],
                            group_codes: Mapping[str, torch.Tensor], num_levels: int
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], StructuredLevels]:
    """Tensors permuted into descending group-code order, their expanded weight codes and the group codes.

    ``tensors`` may hold more than the member tensors (they are returned unchanged)."""
    orders = prefix_orders(group_codes)
    permuted = permute_groups(specs, tensors, orders)
    codes = permute_codes(group_codes, orders)
    weight_codes = expand_codes(specs, codes, {n: t.shape for n, t in permuted.items()}, num_levels)
    return permuted, weight_codes, StructuredLevels(list(specs), codes, num_levels)


def parse_structured(src: Any, meta: Any, tensors: Mapping[str, torch.Tensor], weight_codes: Mapping[str, torch.Tensor],
                     levels: Sequence[float], allocation: str, check_counts: bool,
                     depth: Sequence[StackDepth] | None = None) -> StructuredLevels:
    """Read and check a bundle's ``structured`` entry against its tensors and weight codes (DsnnError if bad).

    Checks: known version; member slices fit their tensors; codes in ``0..L`` and ``kept`` matching them; the weight
    codes expanded from the group codes equal the stored ones, and every pruned tensor is a member; with
    ``check_counts``, every level prunes the groups the allocation rule says.
    """
    bad = "the bundle is corrupt; re-create it with dsnn prune --granularity structured"
    if (not isinstance(meta, dict) or meta.get("version") != STRUCTURED_VERSION
            or not isinstance(meta.get("groups"), list)):
        raise DsnnError(f"{src}: metadata 'structured' is not a version-{STRUCTURED_VERSION} group description", bad)
    num = len(levels)
    specs: list[GroupSpec] = []
    codes: dict[str, torch.Tensor] = {}
    for entry in meta["groups"]:
        try:
            spec = GroupSpec.from_json(entry)
            values = [int(c) for c in entry["codes"]]
            kept = [int(k) for k in entry["kept"]]
        except (KeyError, TypeError, ValueError):
            raise DsnnError(f"{src}: a structured group entry is malformed", bad) from None
        if spec.name in codes or spec.count < 1 or len(values) != spec.count or any(not 0 <= c <= num for c in values):
            raise DsnnError(f"{src}: group set {spec.name} has invalid codes", bad)
        code = torch.tensor(values, dtype=torch.uint8)
        if kept != kept_counts(code, num):
            raise DsnnError(f"{src}: group set {spec.name}: 'kept' does not match its codes", bad)
        for member in spec.members:
            tensor = tensors.get(member.tensor)
            if (tensor is None or not 0 <= member.axis < tensor.dim() or member.offset < 0 or member.width < 1
                    or member.span(spec.count)[1] > tensor.shape[member.axis]):
                raise DsnnError(f"{src}: group set {spec.name} names a slice outside tensor {member.tensor}", bad)
        specs.append(spec)
        codes[spec.name] = code
    expanded = expand_codes(specs, codes, {n: t.shape for n, t in tensors.items()}, num)
    if depth:  # the layers a level drops: every parameter of them capped at the layer's code
        expanded = apply_depth(depth, tensors, expanded)
    if set(expanded) != set(weight_codes):
        extra = sorted(set(expanded) ^ set(weight_codes))[0]
        raise DsnnError(f"{src}: tensor {extra} is pruned by the weight codes or the groups but not both", bad)
    for name, code in expanded.items():
        if not torch.equal(code, weight_codes[name]):
            raise DsnnError(f"{src}: the weight codes of {name} differ from its group codes", bad)
    result = StructuredLevels(specs, codes, num)
    if check_counts:
        _check_counts(src, result, levels, allocation)
    return result


def _check_counts(src: Any, result: StructuredLevels, levels: Sequence[float], allocation: str) -> None:
    for k, level in enumerate(levels, start=1):
        if allocation == "global":
            kinds = sorted({s.kind for s in result.specs})
            ok = all(
                sum(s.count - n for s, n in ((s, result.kept(k)[s.name]) for s in result.specs if s.kind == kind))
                == structured_pruned_count(level, sum(s.count for s in result.specs if s.kind == kind),
                                           sum(1 for s in result.specs if s.kind == kind))
                for kind in kinds)
        else:
            kept = result.kept(k)
            ok = all(s.count - kept[s.name] == structured_pruned_count(level, s.count) for s in result.specs)
        if not ok:
            raise DsnnError(f"{src}: the metadata declares level {level:g} but the group codes prune other counts "
                            f"({allocation} allocation)", "the bundle is corrupt (or was edited); re-create it")
