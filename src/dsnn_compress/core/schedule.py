"""Training schedules: gradual (cubic) pruning of the sparsity levels and the learning-rate curve.

Gradual pruning follows Zhu & Gupta 2017 ("To prune, or not to prune"): the sparsity of each level ramps from
``initial_fraction * target`` to ``target`` between ``start_step`` and ``end_step`` along a cubic that prunes fast
at first and slowly at the end. The keep codes are recomputed every ``update_every`` steps inside that window (and
at ``end_step`` exactly, so training finishes at the target levels).

The learning rate warms up linearly from 0 over ``warmup_steps`` steps, then decays (``constant``, ``linear``,
``cosine`` or ``inverse_sqrt``). Steps count from 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol


class PruningScheduleSettings(Protocol):
    """What the gradual schedule reads (a recipe's ``schedule`` section satisfies it)."""

    enabled: bool
    initial_fraction: float
    start_step: int
    end_step: int
    update_every: int


class LRScheduleSettings(Protocol):
    """What the learning-rate curve reads (a recipe's ``lr_schedule`` section satisfies it)."""

    warmup_steps: int
    decay: str
    min_lr_ratio: float


def cubic_fraction(step: int, start_step: int, end_step: int, initial_fraction: float = 0.0) -> float:
    """The fraction of the target sparsity reached at ``step``.

    ``initial_fraction`` up to ``start_step``, 1.0 from ``end_step`` on, and in between
    ``1 + (initial_fraction - 1) * (1 - (step - start_step) / (end_step - start_step)) ** 3``.
    """
    if step <= start_step:
        return 1.0 if step >= end_step else float(initial_fraction)
    if step >= end_step:
        return 1.0
    progress = (step - start_step) / (end_step - start_step)
    return 1.0 + (initial_fraction - 1.0) * (1.0 - progress) ** 3


def scheduled_levels(targets: Sequence[float], step: int, cfg: PruningScheduleSettings) -> list[float]:
    """Each level's sparsity at ``step``: ``target * cubic_fraction(...)`` when the schedule is enabled, else the
    targets. All levels share one fraction, so increasing targets stay non-decreasing (values may be 0)."""
    if not cfg.enabled:
        return [float(t) for t in targets]
    fraction = cubic_fraction(step, cfg.start_step, cfg.end_step, cfg.initial_fraction)
    return [float(t) * fraction for t in targets]


def should_update_codes(step: int, cfg: PruningScheduleSettings) -> bool:
    """Whether the keep codes are recomputed at ``step``: every ``update_every`` steps from ``start_step`` up to
    ``end_step``, and at ``end_step`` itself. Always False when the schedule is disabled."""
    if not cfg.enabled or not cfg.start_step <= step <= cfg.end_step:
        return False
    return step == cfg.end_step or (step - cfg.start_step) % cfg.update_every == 0


def lr_at(step: int, base_lr: float, cfg: LRScheduleSettings, total_steps: int) -> float:
    """The learning rate of (0-based) ``step`` in a run of ``total_steps`` steps.

    * warm-up (``step < warmup_steps``): ``base_lr * (step + 1) / warmup_steps``, so the last warm-up step uses
      ``base_lr``;
    * then, with ``p = (step - warmup) / (total_steps - warmup)`` clamped to [0, 1] and ``m = min_lr_ratio``:
      ``constant``: ``base_lr``; ``linear``: ``base_lr * (1 - (1 - m) * p)``; ``cosine``:
      ``base_lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)``; ``inverse_sqrt``:
      ``base_lr * sqrt(max(warmup, 1) / (step + 1))`` (no floor).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = cfg.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.decay == "constant":
        return base_lr
    if cfg.decay == "inverse_sqrt":
        return base_lr * math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    floor = cfg.min_lr_ratio
    if cfg.decay == "linear":
        return base_lr * (1.0 - (1.0 - floor) * progress)
    if cfg.decay == "cosine":
        return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate decay {cfg.decay!r}")


def sample_levels(num_levels: int, mode: str, random_levels: int, seed: int, step: int) -> list[int]:
    """Level indices (0 = dense) trained at ``step``.

    ``all``: every level. ``sandwich``: the densest (0) and the sparsest (L) plus ``random_levels`` distinct
    middle levels drawn with ``random.Random(seed, step)``, so the choice is reproducible and resume-safe.
    ``uniform``: the densest and the sparsest trained level; the levels drawn from ``(0, largest)`` come from
    :func:`sample_continuous`.
    """
    if num_levels == 0:
        return [0]
    if mode == "all":
        return list(range(num_levels + 1))
    if mode == "uniform":
        return [0, num_levels]
    if mode != "sandwich":  # recipes only allow these modes (training.recipe); anything else is a caller's bug
        raise ValueError(f"unknown sampling mode {mode!r}")
    middle = list(range(1, num_levels))
    rng = random.Random(seed * 1_000_003 + step)
    picked = rng.sample(middle, min(random_levels, len(middle)))
    return sorted({0, num_levels, *picked})


def sample_continuous(largest: float, count: int, seed: int, step: int) -> list[float]:
    """``count`` continuous levels drawn uniformly from the open interval ``(0, largest)`` for ``step`` (sorted).

    The ``uniform`` sampling mode trains these (as Omni-sparsity samples its sparsities). The draw uses its own
    ``random.Random`` derived from ``(seed, step)``, so it is reproducible and resume-safe.
    """
    if count <= 0 or largest <= 0:
        return []
    rng = random.Random(f"uniform:{seed}:{step}")
    drawn: list[float] = []
    while len(drawn) < count:
        value = rng.uniform(0.0, largest)
        if 0.0 < value < largest:
            drawn.append(value)
    return sorted(drawn)
