"""Log-mel features against an independent numpy implementation, plus SpecAugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsnn_compress.data.features import FeatureConfig, log_mel, mel_filterbank, num_frames, spec_augment
from dsnn_compress.errors import DsnnError


def _np_htk_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular filters on the HTK mel scale, written from the textbook definition."""

    def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bin_hz = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bin_hz):
            if lo < f <= centre:
                fb[k, m] = (f - lo) / (centre - lo)
            elif centre < f < hi:
                fb[k, m] = (hi - f) / (hi - centre)
    return fb


def _np_log_mel(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    x = x.astype(np.float64)
    pad = cfg.n_fft // 2
    padded = np.pad(x, (pad, pad), mode="reflect")
    n = np.arange(cfg.win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.win_length)  # periodic Hann
    window = np.zeros(cfg.n_fft)
    left = (cfg.n_fft - cfg.win_length) // 2
    window[left : left + cfg.win_length] = hann
    count = 1 + (len(padded) - cfg.n_fft) // cfg.hop_length
    frames = np.stack([padded[i * cfg.hop_length : i * cfg.hop_length + cfg.n_fft] for i in range(count)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    f_max = cfg.sample_rate / 2 if cfg.f_max is None else cfg.f_max
    fb = _np_htk_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, f_max)
    feats = np.log(power @ fb + 1e-6)
    if cfg.normalize == "per_utterance":
        feats = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-5)
    return feats


def _signal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


def test_filterbank_matches_numpy() -> None:
    cfg = FeatureConfig(n_mels=40, f_min=20.0, f_max=7600.0)
    fb = mel_filterbank(cfg)
    assert fb.shape == (257, 40) and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.numpy(), _np_htk_filterbank(16000, 512, 40, 20.0, 7600.0), atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        FeatureConfig(normalize="none"),
        FeatureConfig(normalize="per_utterance"),
        FeatureConfig(n_fft=400, win_length=400, hop_length=100, n_mels=64, f_min=50.0, f_max=7000.0),
        FeatureConfig(sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=40, normalize="none"),
    ],
)
def test_log_mel_matches_numpy(cfg: FeatureConfig) -> None:
    x = _signal(12345)
    ours = log_mel(torch.from_numpy(x), cfg)
    ref = _np_log_mel(x, cfg)
    assert ours.shape == ref.shape == (num_frames(len(x), cfg), cfg.n_mels)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=1e-4)


def test_per_utterance_normalisation_statistics() -> None:
    feats = log_mel(torch.from_numpy(_signal(16000)), FeatureConfig())
    assert torch.allclose(feats.mean(dim=0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(feats.std(dim=0, unbiased=False), torch.ones(80), atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 7, 159, 160, 161, 256, 257, 400, 511, 512, 513, 16000, 16001])
def test_num_frames_matches_output(n: int) -> None:
    cfg = FeatureConfig()
    feats = log_mel(torch.from_numpy(_signal(n, seed=n)), cfg)
    assert feats.shape == (num_frames(n, cfg), 80)
    assert feats.shape[0] >= 1
    assert torch.isfinite(feats).all()


def test_num_frames_odd_fft() -> None:
    cfg = FeatureConfig(n_fft=401, win_length=400)
    for n in (1, 3, 1000):
        assert log_mel(torch.ones(n) * 0.1, cfg).shape[0] == num_frames(n, cfg)


def test_num_frames_formula() -> None:
    cfg = FeatureConfig()
    assert num_frames(16000, cfg) == 101
    assert num_frames(1, cfg) == 1


def test_log_mel_rejects_bad_input() -> None:
    with pytest.raises(DsnnError, match="empty"):
        log_mel(torch.zeros(0), FeatureConfig())
    with pytest.raises(DsnnError, match="mono"):
        log_mel(torch.zeros(2, 100), FeatureConfig())


def test_config_round_trip_and_validation() -> None:
    cfg = FeatureConfig(n_mels=64, f_max=7000.0, normalize="none")
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["n_mels"] == 64
    with pytest.raises(DsnnError, match="unknown keys dither"):
        FeatureConfig.from_dict({**cfg.to_dict(), "dither": 0.1})
    with pytest.raises(DsnnError, match="normalize"):
        FeatureConfig(normalize="global")
    with pytest.raises(DsnnError, match="win_length"):
        FeatureConfig(win_length=1024)
    with pytest.raises(DsnnError, match="f_max"):
        FeatureConfig(f_max=9000.0)
    with pytest.raises(DsnnError, match="hop_length"):
        FeatureConfig(hop_length=0)


def _bands(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) of the runs of True in a 1-D bool tensor."""
    runs, start = [], None
    for i, v in enumerate([*mask.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_spec_augment_is_deterministic_and_new() -> None:
    feats = torch.randn(300, 80)
    original = feats.clone()
    a = spec_augment(feats, torch.Generator().manual_seed(7))
    b = spec_augment(feats, torch.Generator().manual_seed(7))
    c = spec_augment(feats, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(feats, original)
    assert a.data_ptr() != feats.data_ptr()


def test_spec_augment_single_masks_have_stated_widths() -> None:
    feats = torch.ones(200, 80)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        f_only = spec_augment(feats, gen, freq_masks=1, freq_width=27, time_masks=0)
        cols = (f_only == 0).all(dim=0)
        ((_, f_width),) = _bands(cols)
        assert 1 <= f_width <= 27
        assert ((f_only == 0) == cols.expand_as(f_only)).all()

        t_only = spec_augment(feats, gen, freq_masks=0, time_masks=1, time_width_ratio=0.05)
        rows = (t_only == 0).all(dim=1)
        ((_, t_width),) = _bands(rows)
        assert 1 <= t_width <= 10
        assert ((t_only == 0) == rows.unsqueeze(1).expand_as(t_only)).all()


def test_spec_augment_mask_counts() -> None:
    feats = torch.ones(500, 80)
    for seed in range(20):
        out = spec_augment(feats, torch.Generator().manual_seed(seed), freq_masks=2, time_masks=3)
        zero_cols = (out == 0).all(dim=0)
        zero_rows = (out == 0).all(dim=1)
        assert 1 <= len(_bands(zero_cols)) <= 2
        assert 1 <= len(_bands(zero_rows)) <= 3
        assert int(zero_cols.sum()) <= 2 * 27
        assert int(zero_rows.sum()) <= 3 * 25
        # every zero lies in a masked row or column
        assert ((out == 0) == (zero_cols.unsqueeze(0) | zero_rows.unsqueeze(1))).all()


def test_spec_augment_no_masks_and_tiny_inputs() -> None:
    feats = torch.randn(3, 4)
    assert torch.equal(spec_augment(feats, torch.Generator(), freq_masks=0, time_masks=0), feats)
    out = spec_augment(feats, torch.Generator().manual_seed(0))
    assert out.shape == feats.shape
    with pytest.raises(DsnnError):
        spec_augment(torch.randn(5), torch.Generator())
