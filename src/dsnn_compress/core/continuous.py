"""Continuous levels: any sparsity between dense and the sparsest trained level, nested with the trained ones.

A bundle trained at ``s_1 < ... < s_L`` serves every ``s`` in ``[0, s_L]``. For ``s_k < s < s_{k+1}`` (``s_0 = 0``)
the weights alive at ``k`` and dead at ``k+1`` (keep code exactly ``k``: the *band*) are dropped in ascending order
of a score until the level prunes as many weights as a trained level at ``s`` would:

* **score**: the dense magnitude ``|w|`` of the bundle's stored weights (compared as float32, which is exact for
  fp16/bf16/fp32 weights); among equal scores the weight that comes first is dropped first (lower flat index; for
  ``global`` allocation, tensors in sorted-name order, then flat index), the tie rule of ``dsnn prune``;
* **how many**: ``per-layer`` allocation: each pruned tensor of ``n`` weights prunes ``round(s * n)`` weights in
  total; ``global``: all pruned tensors together prune ``round(s * total)`` (one threshold over the band). The
  count is clamped to the band, so a bundle whose codes hold other counts still gets nested masks.

At ``s = s_k`` no band weight is dropped and at ``s = s_{k+1}`` all of them are, so a trained level is reproduced
exactly and masks are nested for every pair ``s < s'``: the band order is fixed and a larger ``s`` drops a longer
prefix of it (or a later band).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .levels import Levels, same_level
from .masks import pruned_count

SCORE = "dense magnitude |w| of the stored weights; ties: lower flat index first (global: tensors by name)"
"""The documented order in which band weights are dropped (also written into reports)."""


def band_of(levels: Sequence[float], value: float) -> tuple[int, bool]:
    """``(k, trained)`` for a level ``value`` in [0, largest]: the index of the trained level at or below it and
    whether ``value`` is that trained level."""
    all_levels = Levels(tuple(levels)).all
    for index, candidate in enumerate(all_levels):
        if same_level(candidate, value):
            return index, True
    return max(i for i, candidate in enumerate(all_levels) if candidate < value), False


def _dropped(weights: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], drop: int) -> torch.Tensor:
    """Which band weights are dropped: the ``drop`` smallest ``|w|`` (as float32) of the concatenation of
    ``weights[i].flatten()[positions[i]]``, ties at the threshold taken in concatenation order - what a stable
    ascending sort would give, found with one ``kthvalue`` selection instead of a sort."""
    scores = torch.cat([w.detach().reshape(-1)[p].float().abs() for w, p in zip(weights, positions)])
    if drop <= 0:
        return torch.zeros(scores.numel(), dtype=torch.bool)
    if drop >= scores.numel():
        return torch.ones(scores.numel(), dtype=torch.bool)
    threshold = torch.kthvalue(scores, drop).values
    out = scores < threshold
    ties = (scores == threshold).nonzero().reshape(-1)
    out[ties[: drop - int(out.sum())]] = True
    return out


def keep_masks(
    tensors: Mapping[str, torch.Tensor],
    codes: Mapping[str, torch.Tensor],
    levels: Sequence[float],
    level: float | str,
    allocation: str = "per-layer",
) -> dict[str, torch.Tensor]:
    """Boolean keep-mask of every coded tensor at ``level`` (any value in [0, largest level], see the module doc).

    ``tensors`` are the dense weights the score is read from (same names and shapes as ``codes``).
    """
    value = Levels(tuple(levels)).resolve(level, "this bundle")
    k, trained = band_of(levels, value)
    if trained:
        return {name: code >= k for name, code in codes.items()}
    names = sorted(codes)
    flat_codes = [codes[n].reshape(-1) for n in names]
    positions = [(c == k).nonzero().reshape(-1) for c in flat_codes]
    masks = {n: (c >= k + 1) for n, c in zip(names, flat_codes)}

    def revive(group: Sequence[int]) -> None:
        """Keep the band weights of tensors ``group`` that the count at ``value`` does not drop."""
        sizes = [int(positions[i].numel()) for i in group]
        band = sum(sizes)
        if band == 0:
            return
        numel = sum(flat_codes[i].numel() for i in group)
        already = sum(int((flat_codes[i] < k).sum()) for i in group)
        drop = min(max(pruned_count(value, numel) - already, 0), band)
        kept = ~_dropped([tensors[names[i]] for i in group], [positions[i] for i in group], drop)
        for i, part in zip(group, torch.split(kept, sizes)):
            masks[names[i]][positions[i][part]] = True

    if allocation == "global":
        revive(range(len(names)))
    else:
        for i in range(len(names)):
            revive([i])
    return {n: masks[n].reshape(codes[n].shape) for n in names}
