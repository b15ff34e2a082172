"""How `dsnn evaluate` times its levels: interleaved passes over the same audio, median and range of RTFx.

One pass runs every level once (the levels rotated by one from pass to pass); a level's RTFx is its audio seconds
over the median of its passes' processing seconds, and its range is the slowest and the fastest pass. Background
load that slows one pass down then moves one sample of every level it overlaps, not the level's figure, and a
difference between two levels whose ranges overlap is not claimed (:meth:`~.results.EvaluationReport.
speed_vs_dense`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TIMED_AUDIO_SECONDS = 120.0
"""Audio every timing pass decodes, at least (all of it when the data holds less): the passes after the first one,
which also scores every utterance, time only these batches, so that repeats cost little on a large test set."""

clock: Callable[[], float] = time.perf_counter
"""The timer (a module attribute, so that tests can make it noisy)."""


def pass_order(levels: Sequence[float], index: int) -> list[float]:
    """The levels in the order pass ``index`` runs them: rotated by ``index``, so that no level always runs first
    after the others (or right after a given one)."""
    shift = index % len(levels) if levels else 0
    return [*levels[shift:], *levels[:shift]]


def timed_batches(batches: Sequence[Sequence[int]], seconds: Sequence[float],
                  budget: float = TIMED_AUDIO_SECONDS) -> list[int]:
    """Indices of the batches every timing pass decodes: all of them when they hold at most ``budget`` seconds of
    audio, otherwise every k-th batch (from the middle of the first k) with the largest k whose batches still hold
    ``budget`` seconds: the batches are sorted by length, so short and long utterances are timed alike."""
    audio = [sum(seconds[i] for i in batch) for batch in batches]
    if sum(audio) <= budget:
        return list(range(len(batches)))
    stride = max(1, int(sum(audio) // budget))
    while stride > 1 and sum(audio[stride // 2::stride]) < budget:
        stride -= 1
    return list(range(stride // 2, len(batches), stride))


@dataclass(frozen=True)
class LevelTiming:
    """The processing seconds of each timing pass of one level over ``audio_seconds`` of audio."""

    audio_seconds: float
    passes: tuple[float, ...]

    @property
    def processing_seconds(self) -> float:
        """The median pass."""
        return statistics.median(self.passes)

    @property
    def rtfx(self) -> float | None:
        """Audio seconds / median processing seconds (None when no time was measured)."""
        median = self.processing_seconds
        return self.audio_seconds / median if median > 0 else None

    @property
    def rtfx_range(self) -> tuple[float, float] | None:
        """(slowest pass, fastest pass) as RTFx (None when a pass took no measurable time)."""
        if min(self.passes) <= 0:
            return None
        return self.audio_seconds / max(self.passes), self.audio_seconds / min(self.passes)
