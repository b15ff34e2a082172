"""Load audio files as mono float32 waveforms at a requested sample rate.

Decoding uses ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis and friends). Resampling uses
``soxr`` (``soxr.resample``): the SoX resampler gives high-quality band-limited resampling, is fast
on CPU, ships as a small self-contained wheel and is well maintained, so it is the one resampler this
package relies on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import DsnnError

_SOUNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DsnnError(f"audio file not found: {path}", hint="check the manifest's audio paths")
    if not path.is_file():
        raise DsnnError(f"audio path is not a file: {path}")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def audio_duration(path: str | os.PathLike[str]) -> float:
    """Duration in seconds read from the file header (cheap: no decoding)."""
    p = Path(path)
    _check_file(p)
    try:
        info = sf.info(str(p))
    except _SOUNDFILE_ERRORS as exc:
        raise DsnnError(f"cannot read audio {p}: {_reason(exc)}", hint="is it a valid WAV/FLAC/OGG file?") from None
    if info.samplerate <= 0:
        raise DsnnError(f"cannot read audio {p}: invalid sample rate {info.samplerate}")
    return float(info.frames) / float(info.samplerate)


def load_audio(
    path: str | os.PathLike[str],
    sample_rate: int,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Mono float32 waveform in [-1, 1] at ``sample_rate``; ``offset``/``duration`` select a segment (s).

    Multi-channel audio is downmixed by averaging the channels; a file at another rate is resampled
    with soxr. Raises :class:`DsnnError` for a missing, unreadable or empty file (or empty segment).
    """
    if sample_rate <= 0:
        raise DsnnError(f"invalid sample rate {sample_rate}")
    p = Path(path)
    _check_file(p)
    try:
        with sf.SoundFile(str(p)) as f:
            file_rate = f.samplerate
            start = max(0, int(round(offset * file_rate)))
            frames = -1 if duration is None else max(0, int(round(duration * file_rate)))
            if start:
                if start >= f.frames:
                    raise DsnnError(
                        f"audio {p}: offset {offset:g}s is beyond its end ({f.frames / file_rate:g}s)",
                        hint="check the manifest's offset/duration",
                    )
                f.seek(start)
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except DsnnError:
        raise
    except _SOUNDFILE_ERRORS as exc:
        raise DsnnError(f"cannot read audio {p}: {_reason(exc)}", hint="is it a valid WAV/FLAC/OGG file?") from None
    if data.shape[0] == 0 and frames == 0:
        raise DsnnError(f"the segment of {p} selected by duration {duration:g}s holds no samples",
                        hint="fix the manifest's duration (or leave it out to read the whole file)")
    if data.shape[0] == 0:
        raise DsnnError(f"audio {p} is empty (zero samples)", hint="remove it from the manifest")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
        if mono.shape[0] == 0:
            raise DsnnError(f"audio {p} is too short to resample to {sample_rate} Hz")
    if not np.all(np.isfinite(mono)):
        raise DsnnError(f"audio {p} contains NaN or infinite samples")
    return np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32)
