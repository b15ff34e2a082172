"""Activation statistics: the RMS of every input feature of the layers whose weights are scored.

The model runs on calibration audio the way it runs at inference, and a forward pre-hook on each ``nn.Linear`` and
(non-grouped) ``nn.Conv1d``/``nn.Conv2d`` that owns a scored weight accumulates the sum of squares of each input
feature (Linear: the last dimension; convolutions: the channel dimension) over every position it sees.

Whisper (an adapter with ``greedy_tokens``) runs as Wanda runs a language model on its own text: the encoder on the
audio and the decoder teacher-forced on the model's *own greedy transcript*, so the decoder statistics come from
the tokens it actually produces; the greedy decode itself is not observed (its one-token-at-a-time passes would
count the same positions again). CTC models run one forward pass on the audio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.batch import Batch
from ..models.base import ModelAdapter
from .audio import CalibrationAudio

OBSERVABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class ActivationStats:
    """Per-input-feature RMS of the layers that own the observed weights."""

    rms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weight name -> ``[in_features]`` float64 RMS of the inputs it multiplies."""
    positions: dict[str, int] = field(default_factory=dict)
    """Weight name -> positions (tokens, frames) its statistics cover."""
    unobserved: list[str] = field(default_factory=list)
    """Requested weights whose inputs cannot be observed (not a Linear/Conv weight, or a grouped convolution)."""


def observable_module(model: nn.Module, weight_name: str) -> nn.Module | None:
    """The Linear/Conv module whose ``weight`` is ``weight_name`` (None for anything else, grouped convs included)."""
    module_name, _, leaf = weight_name.rpartition(".")
    if leaf != "weight":
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if not isinstance(module, OBSERVABLE) or getattr(module, "groups", 1) != 1:
        return None
    return module


@contextlib.contextmanager
def observing(model: nn.Module, names: Sequence[str], stats: ActivationStats) -> Iterator[Callable[[bool], None]]:
    """Hooks that add each observed module's input sums of squares into ``stats`` while switched on.

    Yields ``switch(on)``; sums are turned into RMS values when the context ends.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    active = [False]
    handles = []

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            if not active[0] or not inputs:
                return
            x = inputs[0].detach()
            if isinstance(module, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).T if x.dim() > 2 else x.T
            sums[name] = sums.get(name, 0) + flat.double().pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + int(flat.shape[0])
        return hook

    for name in names:
        module = observable_module(model, name)
        if module is None:
            stats.unobserved.append(name)
            continue
        handles.append(module.register_forward_pre_hook(hook_for(name, module)))

    def switch(on: bool) -> None:
        active[0] = on

    try:
        yield switch
    finally:
        for handle in handles:
            handle.remove()
        for name, total in sums.items():
            stats.rms[name] = (total / max(counts[name], 1)).sqrt()
            stats.positions[name] = counts[name]


def self_labelled(adapter: ModelAdapter, batch: Batch) -> Batch:
    """``batch`` with the model's own greedy tokens as targets (sequence-to-sequence adapters), else unchanged."""
    greedy = getattr(adapter, "greedy_tokens", None)
    if greedy is None:
        return batch
    return batch.with_targets(greedy(batch))


def collect_stats(adapter: ModelAdapter, audio: CalibrationAudio, names: Sequence[str],
                  on_progress: Callable[[int, int], None] | None = None) -> ActivationStats:
    """Run the model on the calibration audio (see the module docstring) and return the RMS of each observed
    weight's inputs; weights whose inputs cannot be observed are listed in ``unobserved``."""
    stats = ActivationStats()
    model = adapter.model
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.no_grad(), observing(model, names, stats) as switch:
            for batch in audio.batches(adapter):
                labelled = self_labelled(adapter, batch)
                switch(True)
                adapter.log_probs(labelled)
                switch(False)
                done += len(batch)
                if on_progress:
                    on_progress(done, len(audio.ids))
    finally:
        model.train(was_training)
    return stats
