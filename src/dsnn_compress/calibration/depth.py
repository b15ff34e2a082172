"""Layer importance for depth levels: the calibration cost of skipping layers, and a nested drop order from it.

Skipping a layer means zeroing every parameter of it, which turns a pre-norm residual layer into the identity
(:mod:`~dsnn_compress.core.depth`). The cost is the mean KL divergence from the dense model's posteriors (Whisper:
decoder tokens teacher-forced on the dense model's greedy transcript) to the model with the layers skipped, as for
:mod:`.sensitivity`. The order is greedy and sequential: the cheapest layer to skip goes first, then the cheapest
to skip *together with* the ones already gone, and so on, so the order accounts for layers that can stand in for
each other (a layer whose neighbour is gone may become indispensable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.base import ModelAdapter
from .audio import CalibrationAudio
from .sensitivity import DEFAULT_UTTERANCES, calibration_cost, dense_references


def layer_parameters(model: torch.nn.Module, stack: str, layer: int) -> list[torch.nn.Parameter]:
    """Every parameter of layer ``layer`` of ``stack`` (``<stack>.<layer>.*``)."""
    prefix = f"{stack}.{layer}."
    return [p for name, p in model.named_parameters() if name.startswith(prefix)]


def importance_order(adapter: ModelAdapter, audio: CalibrationAudio, stack: str, layers: int, drop: int,
                     utterances: int = DEFAULT_UTTERANCES, on_progress: Callable[[int, int], None] | None = None
                     ) -> tuple[list[int], list[float]]:
    """The first ``drop`` layers of ``stack`` to drop, in order, and the cumulative cost after each (see the module
    docstring). The model's weights are restored exactly."""
    model = adapter.model
    was_training = model.training
    model.eval()
    order: list[int] = []
    costs: list[float] = []
    total = sum(layers - i for i in range(drop))
    done = 0
    saved = {i: [p.detach().clone() for p in layer_parameters(model, stack, i)] for i in range(layers)}
    try:
        references = dense_references(adapter, audio, utterances)
        with torch.no_grad():
            for _ in range(drop):
                best, best_cost = -1, float("inf")
                for candidate in (i for i in range(layers) if i not in order):
                    for p in layer_parameters(model, stack, candidate):
                        p.zero_()
                    cost = calibration_cost(adapter, references)
                    for p, value in zip(layer_parameters(model, stack, candidate), saved[candidate], strict=True):
                        p.copy_(value)
                    if cost < best_cost:
                        best, best_cost = candidate, cost
                    done += 1
                    if on_progress:
                        on_progress(done, total)
                order.append(best)
                costs.append(best_cost)
                for p in layer_parameters(model, stack, best):
                    p.zero_()
    finally:
        for i, values in saved.items():
            for p, value in zip(layer_parameters(model, stack, i), values, strict=True):
                p.data.copy_(value)
        model.train(was_training)
    return order, costs


def full_order(chosen: Sequence[int], layers: int) -> tuple[int, ...]:
    """``chosen`` followed by the remaining layers (never dropped at any level) in index order."""
    return (*chosen, *(i for i in range(layers) if i not in chosen))
