"""Structured groups: coupled structures (FFN neurons, attention heads, channels), their scores and keep codes.

A :class:`GroupSpec` is one *set* of groups (the hidden neurons of one FFN, the heads of one attention block): group
``g`` occupies entries ``offset + g*width ... offset + (g+1)*width - 1`` along ``axis`` of each :class:`Member`
tensor. Families declare their sets (``structured_groups(adapter)``); everything here is family-agnostic.

Groups are scored by the RMS of their scored member entries (L2, averaged so groups of different sizes compare
under global allocation), get nested keep codes exactly as weights do (level ``k`` keeps a group iff its code is
``>= k``), and expand to per-weight codes (the minimum over the groups containing an entry). The design is in
``docs/structured.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .masks import ALLOCATIONS

GRANULARITIES = ("weight", "structured")


@dataclass(frozen=True)
class Member:
    """Where the groups of a set sit in one tensor: group ``g`` is ``[offset + g*width, offset + (g+1)*width)``
    along ``axis``. ``scored``: the entries count in the group's magnitude score (weights, not biases/norms)."""

    tensor: str
    axis: int
    offset: int = 0
    width: int = 1
    scored: bool = True

    def to_json(self) -> dict:
        """JSON form stored in the bundle."""
        return {"tensor": self.tensor, "axis": self.axis, "offset": self.offset, "width": self.width,
                "scored": self.scored}

    def span(self, count: int) -> tuple[int, int]:
        """First and one-past-last index along ``axis`` that ``count`` groups occupy."""
        return self.offset, self.offset + count * self.width


@dataclass(frozen=True)
class GroupSpec:
    """One set of ``count`` groups of one ``kind`` (``ffn-neuron``, ``attention-head``, ``conv-channel``, ...)."""

    name: str
    kind: str
    layer: int
    count: int
    members: tuple[Member, ...]

    def to_json(self) -> dict:
        """JSON form stored in the bundle (without codes)."""
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "count": self.count,
                "members": [m.to_json() for m in self.members]}

    @classmethod
    def from_json(cls, data: Mapping) -> GroupSpec:
        """Inverse of :meth:`to_json` (raises KeyError/TypeError/ValueError on malformed input)."""
        members = tuple(Member(str(m["tensor"]), int(m["axis"]), int(m["offset"]), int(m["width"]),
                               bool(m["scored"])) for m in data["members"])
        return cls(str(data["name"]), str(data["kind"]), int(data["layer"]), int(data["count"]), members)


def _blocks(tensor: torch.Tensor, member: Member, count: int) -> torch.Tensor:
    """``[count, entries per group]`` view-or-copy of the member slices of ``tensor``."""
    start, stop = member.span(count)
    return tensor.movedim(member.axis, 0)[start:stop].reshape(count, -1)


def group_scores(spec: GroupSpec, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """RMS of each group's scored member entries (float64, ``[count]``)."""
    total = torch.zeros(spec.count, dtype=torch.float64)
    entries = 0
    for member in spec.members:
        if not member.scored:
            continue
        block = _blocks(tensors[member.tensor].detach().to(torch.float64), member, spec.count)
        total += block.pow(2).sum(1)
        entries += block.shape[1]
    return (total / max(entries, 1)).sqrt()


def structured_pruned_count(sparsity: float, count: int, sets: int = 1) -> int:
    """Groups a level prunes out of ``count`` spread over ``sets`` sets: ``min(round(s * count), count - sets)``
    (every set keeps at least one group)."""
    return max(0, min(int(round(sparsity * count)), count - sets))


def _codes_from_order(order: torch.Tensor, counts: Sequence[int], size: int) -> torch.Tensor:
    """Codes for elements pruned in ``order`` (first pruned first): code = levels whose count it survives."""
    rank = torch.empty(size, dtype=torch.int64)
    rank[order] = torch.arange(order.numel())
    codes = torch.zeros(size, dtype=torch.uint8)
    for p in counts:
        codes += (rank >= p).to(torch.uint8)
    return codes


def compute_group_codes(specs: Sequence[GroupSpec], tensors: Mapping[str, torch.Tensor], sparsities: Sequence[float],
                        allocation: str = "per-layer") -> dict[str, torch.Tensor]:
    """Nested group keep codes (uint8 ``[count]`` per set name) at ``sparsities`` (non-decreasing, in [0, 1)).

    ``per-layer``: each set prunes its lowest-scored groups. ``global``: one ranking per kind over all sets of that
    kind (sets in name order, ties: lower index first), each set's best group reserved so it keeps one.
    """
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r}", f"choose one of {', '.join(ALLOCATIONS)}")
    if allocation == "per-row":
        raise UsageError("--allocation per-row compares single weights within a row; structured levels prune whole "
                         "groups", "use --allocation per-layer or global with --granularity structured")
    if any(not 0.0 <= s < 1.0 for s in sparsities) or any(b < a for a, b in zip(sparsities, sparsities[1:])):
        raise UsageError(f"sparsities {list(sparsities)} must be non-decreasing values in [0, 1)")
    codes: dict[str, torch.Tensor] = {}
    if allocation == "per-layer":
        for spec in specs:
            order = torch.sort(group_scores(spec, tensors), stable=True).indices
            codes[spec.name] = _codes_from_order(order, [structured_pruned_count(s, spec.count) for s in sparsities],
                                                 spec.count)
        return codes
    for kind in sorted({s.kind for s in specs}):
        sets = sorted((s for s in specs if s.kind == kind), key=lambda s: s.name)
        scores, reserved, offsets = [], [], []
        start = 0
        for spec in sets:
            score = group_scores(spec, tensors)
            reserved.append(start + int(torch.sort(score, stable=True).indices[-1]))
            scores.append(score)
            offsets.append(start)
            start += spec.count
        flat = torch.cat(scores)
        flat[reserved] = float("inf")  # the reserved groups rank last and no count reaches them
        order = torch.sort(flat, stable=True).indices
        counts = [structured_pruned_count(s, start, len(sets)) for s in sparsities]
        all_codes = _codes_from_order(order, counts, start)
        for spec, offset in zip(sets, offsets):
            codes[spec.name] = all_codes[offset:offset + spec.count].clone()
    return codes


def expand_codes(specs: Sequence[GroupSpec], group_codes: Mapping[str, torch.Tensor],
                 shapes: Mapping[str, Sequence[int]], num_levels: int) -> dict[str, torch.Tensor]:
    """Per-weight codes of every member tensor: the minimum code of the groups containing each entry (``L`` if
    none), so a group mask expands to exactly the weights, biases and norm entries of its slices."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        codes = group_codes[spec.name].to(torch.uint8)
        for member in spec.members:
            shape = tuple(int(s) for s in shapes[member.tensor])
            code = out.setdefault(member.tensor, torch.full(shape, num_levels, dtype=torch.uint8))
            along = torch.full((shape[member.axis],), num_levels, dtype=torch.uint8)
            start, stop = member.span(spec.count)
            along[start:stop] = codes.repeat_interleave(member.width)
            view = [1] * len(shape)
            view[member.axis] = shape[member.axis]
            torch.minimum(code, along.reshape(view), out=code)
    return out


def group_codes_from_weights(specs: Sequence[GroupSpec], weight_codes: Mapping[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
    """Recover group codes from expanded weight codes: the largest code found in any of a group's slices (an entry
    shared with another set holds the smaller of the two codes, and every set keeps one group at every level)."""
    out = {}
    for spec in specs:
        best = torch.zeros(spec.count, dtype=torch.uint8)
        for member in spec.members:
            block = _blocks(weight_codes[member.tensor], member, spec.count)
            best = torch.maximum(best, block.max(1).values.to(torch.uint8))
        out[spec.name] = best
    return out


def kept_counts(codes: torch.Tensor, num_levels: int) -> list[int]:
    """Groups alive at each level ``0..L``."""
    return [int((codes >= k).sum()) for k in range(num_levels + 1)]


def is_prefix_ordered(codes: torch.Tensor) -> bool:
    """True when codes never increase along the set: every level keeps a prefix of the groups."""
    c = codes.to(torch.int64)
    return bool((c[1:] <= c[:-1]).all()) if c.numel() > 1 else True


def _axis_indices(specs: Sequence[GroupSpec], shapes: Mapping[str, Sequence[int]], per_group) -> dict:
    """``{(tensor, axis): index tensor}`` built by ``per_group(spec, member) -> entries for the member's span``."""
    out: dict[tuple[str, int], torch.Tensor] = {}
    for spec in specs:
        for member in spec.members:
            key = (member.tensor, member.axis)
            idx = out.setdefault(key, torch.arange(int(shapes[member.tensor][member.axis])))
            start, stop = member.span(spec.count)
            idx[start:stop] = per_group(spec, member)
    return out


def prefix_orders(group_codes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each set, the permutation that sorts its groups by descending code (stable)."""
    return {name: torch.sort(codes.to(torch.int64), descending=True, stable=True).indices
            for name, codes in group_codes.items()}


def permute_groups(specs: Sequence[GroupSpec], tensors: Mapping[str, torch.Tensor],
                   orders: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each set's groups reordered by ``orders[name]`` (new group ``i`` = old ``order[i]``) in every
    member slice: an equivalent network when the family's sets are complete. Non-member tensors are returned as is."""
    def entries(spec: GroupSpec, member: Member) -> torch.Tensor:
        order = orders[spec.name].to(torch.int64)
        return (member.offset + order[:, None] * member.width + torch.arange(member.width)).reshape(-1)

    out = dict(tensors)
    for (name, axis), idx in _axis_indices(specs, {n: t.shape for n, t in tensors.items()}, entries).items():
        out[name] = out[name].index_select(axis, idx)
    return out


def permute_codes(group_codes: Mapping[str, torch.Tensor], orders: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Group codes reordered as :func:`permute_groups` reorders the groups."""
    return {name: codes[orders[name]] for name, codes in group_codes.items()}


def compact_tensors(specs: Sequence[GroupSpec], tensors: Mapping[str, torch.Tensor],
                    group_codes: Mapping[str, torch.Tensor], level_index: int) -> dict[str, torch.Tensor]:
    """The tensors of the physically smaller network at ``level_index``: every member axis keeps only the entries
    of groups alive there (in order; a prefix for prefix-ordered codes). Contiguous copies."""
    shapes = {n: t.shape for n, t in tensors.items()}
    keep = _axis_indices(specs, shapes, lambda spec, member: (
        group_codes[spec.name] >= level_index).repeat_interleave(member.width).to(torch.int64))
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for (name, axis), marks in keep.items():
        # _axis_indices starts from arange; entries outside every span are always kept
        mask = torch.ones(int(shapes[name][axis]), dtype=torch.bool)
        masks[(name, axis)] = mask
        for spec in specs:
            for member in spec.members:
                if (member.tensor, member.axis) == (name, axis):
                    start, stop = member.span(spec.count)
                    mask[start:stop] = marks[start:stop].bool()
    out = {}
    for name, tensor in tensors.items():
        for (tname, axis), mask in masks.items():
            if tname == name:
                tensor = tensor.index_select(axis, mask.nonzero().reshape(-1))
        out[name] = tensor.contiguous()
    return out


def check_granularity(value: str) -> str:
    """``value`` if it is a known granularity, else UsageError listing them."""
    if value not in GRANULARITIES:
        raise UsageError(f"unknown granularity {value!r}", f"choose one of {', '.join(GRANULARITIES)}")
    return value
