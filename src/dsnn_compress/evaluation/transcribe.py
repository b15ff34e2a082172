"""`dsnn transcribe`: one transcript per audio file at a chosen level."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.audio import load_audio
from ..sources.runnable import load_model
from .evaluate import transcribe_waveforms


def transcribe(model_path: str | Path, audio: Sequence[str | Path], level: float | str = 0.0,
               audio_ctx: int | None = None) -> list[dict[str, Any]]:
    """Greedy transcripts of ``audio`` files with the model at ``level``; ``[{"file", "level", "trained", "text"}]``
    (``trained`` is False for a level between two trained levels, served by continuous levels).

    ``audio_ctx`` sets a Whisper model's encoder context (positions of 20 ms).
    """
    loaded = load_model(model_path, audio_ctx)
    loaded.set_level(level)
    active = loaded.sparsity.level if loaded.sparsity else 0.0
    trained = loaded.is_trained(active)
    waves = [load_audio(path, loaded.adapter.sample_rate) for path in audio]
    results = []
    for path, wave in zip(audio, waves, strict=True):
        text = transcribe_waveforms(loaded, [wave], [str(path)])[0]
        results.append({"file": str(path), "level": active, "trained": trained, "text": text})
    return results
