"""Calibration audio: the first usable utterances of an audio-only manifest, loaded once, in model-ready batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.audio import load_audio
from ..data.batch import Batch, pad_batch
from ..data.manifest import read_manifest
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter

DEFAULT_UTTERANCES = 64
"""Calibration utterances used when the caller gives no count."""
BATCH_SIZE = 8
"""Utterances per calibration forward pass (sorted by length, so little padding)."""


@dataclass
class CalibrationAudio:
    """Waveforms for calibration, with what identifies them in a bundle's provenance."""

    manifest: Path
    sha256: str
    """Hex sha256 of the manifest file's bytes."""
    ids: list[str] = field(default_factory=list)
    waveforms: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 16000
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Total audio length."""
        return float(sum(w.shape[0] for w in self.waveforms)) / self.sample_rate

    def provenance(self) -> dict[str, object]:
        """What a bundle records about its calibration data."""
        return {"manifest": str(self.manifest), "sha256": self.sha256, "utterances": len(self.ids),
                "seconds": round(self.seconds, 3), "skipped": len(self.skipped)}

    def batches(self, adapter: ModelAdapter, limit: int | None = None,
                batch_size: int = BATCH_SIZE) -> Iterator[Batch]:
        """The first ``limit`` utterances (all: None) as the adapter's batches, shortest first."""
        count = len(self.ids) if limit is None else min(limit, len(self.ids))
        order = sorted(range(count), key=lambda i: (self.waveforms[i].shape[0], i))
        for start in range(0, count, batch_size):
            chosen = order[start:start + batch_size]
            inputs = [adapter.prepare(self.waveforms[i]) for i in chosen]
            yield pad_batch(inputs, [[] for _ in chosen], ["" for _ in chosen], [self.ids[i] for i in chosen])


def load_calibration(manifest: str | Path, adapter: ModelAdapter, utterances: int = DEFAULT_UTTERANCES
                     ) -> CalibrationAudio:
    """The first ``utterances`` usable clips of ``manifest`` (transcripts not needed) at the adapter's sample rate.

    A clip that cannot be read or that the model cannot take (Whisper: longer than its encoder context) is skipped
    and listed; UsageError (exit 2) when no clip is usable or ``utterances`` is not positive.
    """
    if utterances <= 0:
        raise UsageError(f"--calibration-utterances must be positive, got {utterances}")
    path = Path(manifest)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UsageError(f"cannot read the calibration manifest {path}: {exc.strerror or exc}",
                         "pass an existing manifest of audio files (transcripts are not needed)") from None
    try:
        entries = read_manifest(path, require_text=False)
    except DsnnError as exc:
        raise UsageError(f"calibration manifest: {exc.message}", exc.hint) from None
    audio = CalibrationAudio(manifest=path, sha256=digest, sample_rate=adapter.sample_rate)
    for utt in entries:
        if len(audio.ids) >= utterances:
            break
        try:
            wave = load_audio(utt.audio_path, adapter.sample_rate, utt.offset, utt.duration)
            adapter.prepare(wave)
        except DsnnError as exc:
            audio.skipped.append({"id": utt.id, "reason": exc.one_line()})
            continue
        audio.ids.append(utt.id)
        audio.waveforms.append(wave)
    if not audio.ids:
        first = f" (first: {audio.skipped[0]['reason']})" if audio.skipped else ""
        raise UsageError(f"the calibration manifest {path} holds no usable audio: {len(audio.skipped)} "
                         f"utterance(s) skipped{first}", "give a manifest of readable speech clips the model accepts")
    return audio
