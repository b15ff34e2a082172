"""Log-mel features and SpecAugment, in plain torch (no torchaudio).

``log_mel`` frames the waveform like ``torch.stft(center=True, pad_mode="reflect")`` with a periodic
Hann window of ``win_length`` (zero-padded to ``n_fft``), takes the power spectrum, applies an HTK-scale
triangular mel filterbank, then ``log(x + 1e-6)`` and optionally per-utterance mean/variance
normalisation of each mel bin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DsnnError

LOG_FLOOR = 1e-6
NORM_EPS = 1e-5
NORMALIZE_MODES = ("per_utterance", "none")


@dataclass
class FeatureConfig:
    """Log-mel feature settings (all lengths in samples)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None
    normalize: str = "per_utterance"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DsnnError` when the settings are inconsistent."""
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DsnnError(f"feature config: {name} must be a positive integer, got {value!r}")
        if self.win_length > self.n_fft:
            raise DsnnError(f"feature config: win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        nyquist = self.sample_rate / 2
        if not 0 <= self.f_min < self.upper_frequency() <= nyquist:
            raise DsnnError(
                f"feature config: need 0 <= f_min < f_max <= {nyquist:g} Hz, "
                f"got f_min={self.f_min!r}, f_max={self.f_max!r}"
            )
        if self.normalize not in NORMALIZE_MODES:
            raise DsnnError(
                f"feature config: unknown normalize {self.normalize!r}",
                hint=f"use one of {', '.join(NORMALIZE_MODES)}",
            )

    def upper_frequency(self) -> float:
        """``f_max``, defaulting to the Nyquist frequency."""
        return float(self.sample_rate / 2 if self.f_max is None else self.f_max)

    @property
    def frames_per_second(self) -> float:
        """Feature frames per second of audio."""
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Settings from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DsnnError(
                f"feature config: unknown keys {', '.join(unknown)}",
                hint=f"known keys: {', '.join(sorted(known))}",
            )
        return cls(**data)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """HTK-scale triangular mel filterbank ``[n_fft // 2 + 1, n_mels]`` (float32, unnormalised)."""
    n_freqs = cfg.n_fft // 2 + 1
    all_freqs = torch.linspace(0.0, cfg.sample_rate / 2, n_freqs, dtype=torch.float64)
    m_min = _hz_to_mel(torch.tensor(float(cfg.f_min), dtype=torch.float64))
    m_max = _hz_to_mel(torch.tensor(cfg.upper_frequency(), dtype=torch.float64))
    f_pts = _mel_to_hz(torch.linspace(float(m_min), float(m_max), cfg.n_mels + 2, dtype=torch.float64))
    f_diff = f_pts[1:] - f_pts[:-1]  # [n_mels + 1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).to(torch.float32)


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Number of frames :func:`log_mel` produces for ``num_samples`` samples."""
    pad = cfg.n_fft // 2
    return 1 + max(0, num_samples + 2 * pad - cfg.n_fft) // cfg.hop_length


def _window(cfg: FeatureConfig) -> torch.Tensor:
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32)
    left = (cfg.n_fft - cfg.win_length) // 2
    return F.pad(window, (left, cfg.n_fft - cfg.win_length - left))


def log_mel(waveform: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Log-mel features ``[frames, n_mels]`` of a mono waveform ``[T]`` (see the module docstring).

    Signals shorter than ``n_fft // 2 + 1`` samples cannot be reflect-padded; they are zero-padded
    instead, so even a few samples give at least one frame.
    """
    if waveform.dim() != 1:
        raise DsnnError(f"log_mel expects a mono waveform [T], got shape {tuple(waveform.shape)}")
    if waveform.shape[0] == 0:
        raise DsnnError("cannot compute features of an empty waveform")
    x = waveform.to(torch.float32)
    pad = cfg.n_fft // 2
    mode = "reflect" if x.shape[0] > pad else "constant"
    padded = F.pad(x.view(1, 1, -1), (pad, pad), mode=mode).view(-1)
    spec = torch.stft(
        padded,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.n_fft,
        window=_window(cfg).to(x.device),
        center=False,
        return_complex=True,
    )  # [n_freqs, frames]
    power = spec.real.square() + spec.imag.square()
    mel = power.transpose(0, 1) @ mel_filterbank(cfg).to(x.device)  # [frames, n_mels]
    feats = torch.log(mel + LOG_FLOOR)
    if cfg.normalize == "per_utterance":
        mean = feats.mean(dim=0, keepdim=True)
        std = feats.std(dim=0, unbiased=False, keepdim=True)
        feats = (feats - mean) / (std + NORM_EPS)
    return feats


def spec_augment(
    features: torch.Tensor,
    generator: torch.Generator,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width_ratio: float = 0.05,
) -> torch.Tensor:
    """SpecAugment on ``[T, F]`` features: a new tensor with masked bands set to 0.

    Each of the ``freq_masks`` masks zeroes ``w ~ U{1..min(freq_width, F)}`` consecutive mel bins;
    each of the ``time_masks`` masks zeroes ``w ~ U{1..max(1, int(time_width_ratio * T))}``
    consecutive frames (bands may overlap). Draws only from ``generator``, so it is deterministic.
    """
    if features.dim() != 2:
        raise DsnnError(f"spec_augment expects [T, F] features, got shape {tuple(features.shape)}")
    out = features.clone()
    n_time, n_freq = out.shape

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator).item())

    max_f = min(freq_width, n_freq)
    if n_freq and max_f >= 1:
        for _ in range(freq_masks):
            width = 1 + draw(max_f)
            start = draw(n_freq - width + 1)
            out[:, start : start + width] = 0
    max_t = min(max(1, int(math.floor(time_width_ratio * n_time))), n_time)
    if n_time and time_width_ratio > 0:
        for _ in range(time_masks):
            width = 1 + draw(max_t)
            start = draw(n_time - width + 1)
            out[start : start + width, :] = 0
    return out
