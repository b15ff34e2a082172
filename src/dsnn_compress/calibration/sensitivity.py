"""Block sensitivity: what pruning one block alone costs on calibration audio, on a grid of sparsities.

The cost of a block (a transformer layer, :func:`~dsnn_compress.core.scores.block_of`) at sparsity ``g`` is the
mean KL divergence from the dense model's output distribution to the model with only that block pruned to ``g``
(its tensors ranked by the bundle's own scores and comparison groups), per output position: decoder tokens
teacher-forced on the dense model's greedy transcript for Whisper, frames for CTC models.
:func:`~dsnn_compress.core.scores.greedy_profile` turns the costs into nested per-block sparsities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..core.masked import distillation_loss
from ..core.scores import MAX_BLOCK_SPARSITY, blocks, scored_codes
from ..data.batch import Batch
from ..models.base import ModelAdapter
from .audio import CalibrationAudio
from .statistics import self_labelled

DEFAULT_UTTERANCES = 16
"""Calibration utterances the sensitivity measurement uses (the first ones of the calibration audio)."""
GRID_STEP = 0.1
GRID_MARGIN = 0.2
"""The grid reaches this far above the largest level (so that other blocks can stay below it), capped at
:data:`~dsnn_compress.core.scores.MAX_BLOCK_SPARSITY`."""


def sensitivity_grid(levels: Sequence[float]) -> list[float]:
    """Sparsities at which each block is measured: steps of 0.1 up to the largest level plus a margin, and the
    levels themselves."""
    top = min(MAX_BLOCK_SPARSITY, max(levels) + GRID_MARGIN)
    points = {round(GRID_STEP * i, 6) for i in range(1, int(top / GRID_STEP + 1e-9) + 1)}
    points.update(float(level) for level in levels)
    points.add(top)
    return sorted(p for p in points if 0 < p <= top)


Reference = tuple[Batch, torch.Tensor, torch.Tensor]
"""A calibration batch (targets: the dense model's greedy tokens for Whisper), the dense posteriors and lengths."""


def dense_references(adapter: ModelAdapter, audio: CalibrationAudio, utterances: int) -> list[Reference]:
    """The first ``utterances`` calibration clips in batches, with the dense model's posteriors on them (no grad)."""
    out = []
    with torch.no_grad():
        for batch in audio.batches(adapter, limit=utterances):
            labelled = self_labelled(adapter, batch)
            log_probs, lengths = adapter.log_probs(labelled)
            out.append((labelled, log_probs, lengths))
    return out


def calibration_cost(adapter: ModelAdapter, references: list[Reference]) -> float:
    """Mean KL divergence per utterance from the dense posteriors to the model as it is now (no grad)."""
    with torch.no_grad():
        total = sum(float(distillation_loss(reference, adapter.log_probs(batch)[0], lengths, 1.0)) * len(batch)
                    for batch, reference, lengths in references)
    return total / max(1, sum(len(batch) for batch, _, _ in references))


def block_costs(adapter: ModelAdapter, audio: CalibrationAudio, scores: Mapping[str, torch.Tensor],
                allocation: str, grid: Sequence[float], utterances: int = DEFAULT_UTTERANCES,
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, list[tuple[float, float]]]:
    """``{block: [(sparsity, cost), ...]}`` over ``grid`` for every block of the scored tensors (see the module
    docstring). Weights are pruned in place for each measurement and restored exactly afterwards."""
    model = adapter.model
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    groups = blocks(list(scores))
    total, done = len(groups) * len(grid), 0
    try:
        references = dense_references(adapter, audio, utterances)
        with torch.no_grad():
            out: dict[str, list[tuple[float, float]]] = {}
            for block, names in groups.items():
                codes = scored_codes({n: scores[n] for n in names}, list(grid), allocation)
                saved = {n: params[n].detach().clone() for n in names}
                points = []
                for index, sparsity in enumerate(grid, start=1):
                    for n in names:
                        params[n].copy_(saved[n] * (codes[n] >= index).to(saved[n].device, saved[n].dtype))
                    points.append((float(sparsity), calibration_cost(adapter, references)))
                    done += 1
                    if on_progress:
                        on_progress(done, total)
                for n in names:
                    params[n].copy_(saved[n])
                out[block] = points
    finally:
        model.train(was_training)
    return out
