"""`dsnn transcribe`: one transcript per audio file at a chosen level."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.audio import load_audio
from ..runtime.runnable import load_model
from .evaluate import transcribe_waveforms


def transcribe(model_path: str | Path, audio: Sequence[str | Path], level: float | str = 0.0,
               audio_ctx: int | None = None, kernels: str = "dense", *,
               verify: bool = True) -> list[dict[str, Any]]:
    """Greedy transcripts of ``audio`` files with the model at ``level``; ``[{"file", "level", "trained", "text"}]``
    (``trained`` is False for a level between two trained levels, served by continuous levels).

    ``audio_ctx`` sets a Whisper model's encoder context (positions of 20 ms). ``kernels`` (``dense`` | ``sparse`` |
    ``auto``): how pruned layers compute; with ``sparse`` or ``auto`` each result also holds ``kernels`` (mode and
    sparse layers); ``auto`` times the layers on the first file. ``verify`` checks the model file's checksums when it
    has them.
    """
    loaded = load_model(model_path, audio_ctx, kernels, verify=verify)
    if loaded.kernels is None or loaded.sparsity is None:
        loaded.set_level(level)
    else:  # the level is checked before reading audio; it is set once auto kernels can time on the first file
        loaded.resolve_level(level)
    waves = [load_audio(path, loaded.adapter.sample_rate) for path in audio]
    if loaded.kernels is not None:
        if waves:
            loaded.use_kernels(kernels, lambda: transcribe_waveforms(loaded, waves[:1], [str(audio[0])]))
        loaded.set_level(level)
    active = loaded.sparsity.level if loaded.sparsity else 0.0
    trained = loaded.is_trained(active)
    results = []
    for path, wave in zip(audio, waves, strict=True):
        text = transcribe_waveforms(loaded, [wave], [str(path)])[0]
        results.append({"file": str(path), "level": active, "trained": trained, "text": text})
        if loaded.kernels is not None:
            results[-1]["kernels"] = {k: v for k, v in loaded.kernel_report().items() if k != "layers"}
    return results
