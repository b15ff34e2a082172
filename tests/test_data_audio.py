"""Audio loading: formats, resampling, downmix, segments and error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dsnn_compress.data.audio import audio_duration, load_audio
from dsnn_compress.errors import DsnnError

AUDIO = Path(__file__).parent / "data" / "audio"


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("name", ["train-02732.ogg", "test-00010.flac"])
def test_corpus_files_load_as_mono_float32(name: str) -> None:
    path = AUDIO / name
    audio = load_audio(path, 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0
    assert np.abs(audio).max() > 0.01
    assert len(audio) == pytest.approx(audio_duration(path) * 16000, abs=1)


def test_audio_duration_from_header(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(12000, dtype=np.float32), 8000)
    assert audio_duration(path) == pytest.approx(1.5)
    assert audio_duration(AUDIO / "test-00001.flac") == pytest.approx(2.153, abs=1e-3)


def test_resample_8k_to_16k(tmp_path: Path) -> None:
    path = tmp_path / "sine8k.wav"
    sf.write(path, _sine(440.0, 8000, 1.0), 8000, subtype="PCM_16")
    audio = load_audio(path, 16000)
    assert audio.dtype == np.float32
    assert len(audio) == 16000
    assert _dominant_frequency(audio, 16000) == pytest.approx(440.0, abs=2.0)
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.02)


def test_resample_down_to_8k() -> None:
    audio16 = load_audio(AUDIO / "test-00010.flac", 16000)
    audio8 = load_audio(AUDIO / "test-00010.flac", 8000)
    assert len(audio8) == pytest.approx(len(audio16) / 2, abs=1)


def test_stereo_downmix(tmp_path: Path) -> None:
    left = _sine(300.0, 16000, 0.5, amplitude=0.6)
    right = np.zeros_like(left)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24")
    audio = load_audio(path, 16000)
    assert audio.shape == left.shape
    np.testing.assert_allclose(audio, left / 2, atol=1e-5)


def test_offset_and_duration(tmp_path: Path) -> None:
    ramp = (np.arange(16000, dtype=np.float32) / 16000) - 0.5
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, 16000, subtype="FLOAT")
    seg = load_audio(path, 16000, offset=0.25, duration=0.5)
    np.testing.assert_array_equal(seg, ramp[4000:12000])
    tail = load_audio(path, 16000, offset=0.75)
    np.testing.assert_array_equal(tail, ramp[12000:])


def test_float_wav_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.5], dtype=np.float32), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), np.array([0.0, 1.0, -1.0, 0.5], dtype=np.float32))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    for call in (lambda: load_audio(missing, 16000), lambda: audio_duration(missing)):
        with pytest.raises(DsnnError, match=r"audio file not found: .*missing\.wav"):
            call()


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(b"this is not audio at all" * 10)
    for call in (lambda: load_audio(bad, 16000), lambda: audio_duration(bad)):
        with pytest.raises(DsnnError, match=r"cannot read audio .*corrupt\.flac") as info:
            call()
        assert "\n" not in info.value.one_line()


def test_truncated_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.flac"
    cut.write_bytes((AUDIO / "test-00010.flac").read_bytes()[:40])
    with pytest.raises(DsnnError, match=r"cut\.flac"):
        load_audio(cut, 16000)


def test_zero_length_audio(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DsnnError, match=r"empty\.wav is empty"):
        load_audio(empty, 16000)


def test_offset_beyond_end(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(DsnnError, match="beyond its end"):
        load_audio(path, 16000, offset=1.0)


def test_directory_is_not_audio(tmp_path: Path) -> None:
    with pytest.raises(DsnnError, match="not a file"):
        load_audio(tmp_path, 16000)


def test_zero_duration_names_the_manifest_not_the_file(tmp_path: Path) -> None:
    """A manifest's ``duration: 0`` selects nothing from a healthy file: the message must say so."""
    path = tmp_path / "ok.wav"
    sf.write(path, np.full(1600, 0.1, dtype=np.float32), 16000)
    with pytest.raises(DsnnError) as info:
        load_audio(path, 16000, duration=0.0)
    assert "duration 0s holds no samples" in info.value.one_line() and "is empty" not in info.value.one_line()
    assert load_audio(path, 16000).shape == (1600,)
