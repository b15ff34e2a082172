"""Pruning scores beyond magnitude, and nested codes from them (``docs/calibration.md``).

A *score* is one non-negative number per weight, fixed once: the lower it is, the earlier the weight is pruned.
Levels stay nested by construction because every level prunes a prefix of the same ascending order; only the
*count* per comparison group changes with the level.

* ``magnitude``: ``|w|`` (the default, no data needed);
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  ``|w_ij| * rms(x_j)``, the weight's magnitude times the root-mean-square of the input feature it multiplies,
  measured by running the model on calibration audio. RMS rather than Wanda's raw L2 norm: inside a row (Wanda's
  comparison group) both rank alike, and across layers that see different numbers of positions (Whisper's encoder
  and decoder) the RMS keeps the scores comparable.

Comparison groups (``allocation``): ``per-row`` (each output row of a weight prunes ``round(s * row size)``, Wanda's
choice), ``per-layer`` (each tensor prunes ``round(s * numel)``) and ``global`` (one threshold over all tensors).

Per-layer sparsity *profiles* give each block (a transformer layer: every pruned tensor under ``...layers.<i>``)
its own sparsity per level, keeping the parameter-weighted mean at the level:

* ``owl`` (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more outlier scores (above
  ``m`` times the block's mean score) get a lower sparsity, offsets spread over ``[-lambda, +lambda]``;
* ``sensitivity``: the calibration loss of pruning each block alone is measured on a sparsity grid, and each level
  grows the previous level's allocation greedily, always on the block whose next step costs least per pruned
  weight. Growing from the previous level makes every block's sparsity non-decreasing in the level, so the
  profile is nested by construction (what a per-level solver would not guarantee).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..errors import UsageError
from .masks import codes_at_sparsities, pruned_count

METHODS = ("magnitude", "wanda")
"""Score methods of ``dsnn prune --method``."""
CALIBRATED_METHODS = ("wanda",)
"""Methods that need activation statistics from calibration audio."""
PROFILES = ("uniform", "owl", "sensitivity")
"""Per-block sparsity profiles of ``dsnn prune --profile``."""
OWL_M = 5.0
"""OWL's outlier threshold: a score above ``OWL_M`` times its block's mean score is an outlier (the paper's M)."""
OWL_LAMBDA = 0.08
"""OWL's largest sparsity offset of a block from the level (the paper's lambda)."""
MAX_BLOCK_SPARSITY = 0.95
"""No profile prunes a block beyond this fraction, whatever the level."""
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def check_method(method: str) -> str:
    """``method`` if it is a known score method, else UsageError naming the choices."""
    if method not in METHODS:
        raise UsageError(f"unknown pruning method {method!r}", f"choose one of {', '.join(METHODS)}")
    return method


def check_profile(profile: str) -> str:
    """``profile`` if it is a known per-block sparsity profile, else UsageError naming the choices."""
    if profile not in PROFILES:
        raise UsageError(f"unknown sparsity profile {profile!r}", f"choose one of {', '.join(PROFILES)}")
    return profile


def needs_calibration(method: str, profile: str = "uniform") -> bool:
    """True when ``method`` or ``profile`` is computed from activations on calibration audio."""
    return method in CALIBRATED_METHODS or profile == "sensitivity"


def activation_scores(weight: torch.Tensor, input_rms: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|w| * rms(x_in)`` (float32) of a weight ``[out, in, *kernel]`` for per-input-feature RMS ``[in]``.

    A 1-D ``input_rms`` scales dimension 1 of the weight (the input features of ``nn.Linear`` and the input channels
    of ``nn.Conv*``); ValueError when the sizes disagree.
    """
    if weight.dim() < 2 or input_rms.dim() != 1 or weight.shape[1] != input_rms.numel():
        raise ValueError(f"weight {tuple(weight.shape)} does not take {input_rms.numel()} input features")
    shape = [1, input_rms.numel()] + [1] * (weight.dim() - 2)
    return weight.detach().float().abs() * input_rms.float().reshape(shape)


def scored_codes(scores: Mapping[str, torch.Tensor], sparsities: Mapping[str, Sequence[float]] | Sequence[float],
                 allocation: str) -> dict[str, torch.Tensor]:
    """Nested keep codes from fixed ``scores`` (non-negative, one per weight).

    ``sparsities``: one non-decreasing list for every tensor, or a list per tensor (a profile; ``per-layer`` and
    ``per-row`` only). ``allocation``: ``per-row``, ``per-layer`` or ``global`` (see the module docstring).
    """
    if not isinstance(sparsities, Mapping):
        return codes_at_sparsities(scores, list(sparsities), allocation)
    if allocation == "global":
        raise UsageError("a per-block sparsity profile needs --allocation per-layer or per-row",
                         "global allocation already sets each tensor's sparsity from one threshold")
    codes: dict[str, torch.Tensor] = {}
    for name in sorted(scores):
        codes.update(codes_at_sparsities({name: scores[name]}, list(sparsities[name]), allocation))
    return codes


# ----------------------------------------------------------------------------------------------- profiles


def block_of(name: str) -> str:
    """The block a tensor belongs to: its name up to the first numeric component (``model.encoder.layers.3``), or
    the owning module for a tensor outside numbered layers."""
    match = _BLOCK.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Tensor names grouped by :func:`block_of`, blocks and names sorted."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        out.setdefault(block_of(name), []).append(name)
    return dict(sorted(out.items()))


def owl_offsets(scores: Mapping[str, torch.Tensor], m: float = OWL_M, lam: float = OWL_LAMBDA) -> dict[str, float]:
    """OWL's sparsity offset per block: outlier ratios (scores above ``m`` times the block mean) mapped linearly to
    ``[0, 2 * lam]`` and centred, with the sign flipped (more outliers: lower sparsity)."""
    if m <= 0 or not 0 <= lam < 0.5:
        raise UsageError(f"OWL needs m > 0 and 0 <= lambda < 0.5, got m={m:g}, lambda={lam:g}")
    ratios = {}
    for block, names in blocks(list(scores)).items():
        flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
        ratios[block] = float((flat > m * flat.mean()).float().mean())
    low, high = min(ratios.values()), max(ratios.values())
    spread = {b: (r - low) / (high - low) * 2 * lam if high > low else 0.0 for b, r in ratios.items()}
    centre = sum(spread.values()) / len(spread)
    return {b: -(v - centre) for b, v in spread.items()}


def offset_profile(offsets: Mapping[str, float], sizes: Mapping[str, int], levels: Sequence[float],
                   cap: float = MAX_BLOCK_SPARSITY) -> dict[str, list[float]]:
    """Per-block sparsities at each level: ``clip(level + offset + shift, 0, cap)`` with one shift per level chosen
    so that the size-weighted mean is the level. The sparsity of every block is non-decreasing in the level."""
    total = sum(sizes.values())
    out: dict[str, list[float]] = {b: [] for b in offsets}
    def mean_at(level: float, shift: float) -> float:
        return sum(sizes[b] * min(max(level + o + shift, 0.0), cap) for b, o in offsets.items()) / total

    for level in levels:
        low, high = -1.0, 1.0
        for _ in range(80):  # bisection: mean_at is continuous and non-decreasing in the shift
            mid = (low + high) / 2
            low, high = (mid, high) if mean_at(level, mid) < level else (low, mid)
        for b, o in offsets.items():
            out[b].append(min(max(level + o + high, 0.0), cap))
    for values in out.values():  # float noise of the bisection must not break nesting
        for i in range(1, len(values)):
            values[i] = max(values[i], values[i - 1])
    return out


def greedy_profile(costs: Mapping[str, Sequence[tuple[float, float]]], sizes: Mapping[str, int],
                   levels: Sequence[float]) -> dict[str, list[float]]:
    """Per-block sparsities at each level from measured costs (``costs[block]`` = ``(sparsity, loss increase)``
    points; 0 costs 0), growing each level from the previous one on the cheapest step per pruned weight.

    Costs are made non-decreasing in sparsity (a measured dip is noise); the grid's largest point is the block's
    cap. Each level reaches exactly ``round(level * total)`` pruned weights (the last step is partial).
    """
    curves = {}
    for block, points in costs.items():
        grid = sorted((float(s), float(c)) for s, c in points if s > 0)
        if not grid:
            raise ValueError(f"no cost point for block {block}")
        running, curve = 0.0, [(0.0, 0.0)]
        for sparsity, cost in grid:
            running = max(running, cost)
            curve.append((sparsity, running))
        curves[block] = curve
    total = sum(sizes.values())
    if levels and total and pruned_count(levels[-1], total) > sum(sizes[b] * curves[b][-1][0] for b in curves) + 0.5:
        raise UsageError(f"the sensitivity grid cannot reach level {levels[-1]:g}", "use fewer or smaller levels")
    current = {b: 0.0 for b in curves}
    step = {b: 0 for b in curves}  # index of the segment each block is in
    out: dict[str, list[float]] = {b: [] for b in curves}
    for level in levels:
        need = pruned_count(level, total) - sum(sizes[b] * current[b] for b in curves)
        while need > 1e-6:
            best, best_slope = None, float("inf")
            for b in sorted(curves):
                curve, i = curves[b], step[b]
                if i + 1 >= len(curve):
                    continue
                (s0, c0), (s1, c1) = curve[i], curve[i + 1]
                slope = (c1 - c0) / ((s1 - s0) * sizes[b])
                if slope < best_slope - 1e-15:
                    best, best_slope = b, slope
            if best is None:
                break
            curve, i = curves[best], step[best]
            room = (curve[i + 1][0] - current[best]) * sizes[best]
            if room <= need:
                current[best] = curve[i + 1][0]
                step[best] += 1
                need -= room
            else:
                current[best] += need / sizes[best]
                need = 0.0
        for b in curves:
            out[b].append(current[b])
    return out


def tensor_profile(block_sparsities: Mapping[str, Sequence[float]], names: Sequence[str]) -> dict[str, list[float]]:
    """Each tensor's sparsity per level: its block's."""
    return {name: list(block_sparsities[block_of(name)]) for name in names}
