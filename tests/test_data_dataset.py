"""SpeechDataset, collate, length bucketing and the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dsnn_compress.data.batch import Batch
from dsnn_compress.data.dataset import (
    BadSample,
    Sample,
    SpeechDataset,
    bucket_batches,
    collate,
    make_loader,
    utterance_lengths,
)
from dsnn_compress.data.features import FeatureConfig, log_mel, num_frames
from dsnn_compress.data.manifest import Utterance, read_manifest
from dsnn_compress.data.text import CharTokenizer
from dsnn_compress.errors import DsnnError, UsageError

DATA = Path(__file__).parent / "data"
CFG = FeatureConfig()


def _prepare(waveform: np.ndarray) -> torch.Tensor:
    return log_mel(torch.from_numpy(waveform), CFG)


@pytest.fixture(scope="module")
def utterances() -> list[Utterance]:
    return read_manifest(DATA / "manifest.jsonl")


@pytest.fixture(scope="module")
def tokenizer(utterances: list[Utterance]) -> CharTokenizer:
    return CharTokenizer.build(u.text for u in utterances)


def _dataset(utts: list[Utterance], tok: CharTokenizer, **kwargs: object) -> SpeechDataset:
    return SpeechDataset(utts, _prepare, tok.encode, 16000, **kwargs)  # type: ignore[arg-type]


def test_getitem(utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    ds = _dataset(utterances, tokenizer)
    assert len(ds) == 8
    sample = ds[7]
    assert isinstance(sample, Sample)
    assert sample.id == "test-00001"
    assert sample.text == "it can't make things any worse"
    assert tokenizer.decode(sample.targets) == sample.text
    assert sample.audio_seconds == pytest.approx(2.153, abs=1e-3)
    assert sample.inputs.shape == (num_frames(round(sample.audio_seconds * 16000), CFG), 80)


def test_normalizer_applied(tmp_path: Path, tokenizer: CharTokenizer) -> None:
    utt = Utterance("u", DATA / "audio" / "test-00010.flac", "  Skip, THIS song! ")
    assert _dataset([utt], tokenizer)[0].text == "skip this song"  # type: ignore[union-attr]
    with pytest.raises(DsnnError, match="outside the vocabulary"):
        _dataset([utt], tokenizer, normalizer="none")[0]
    with pytest.raises(UsageError):
        _dataset([utt], tokenizer, normalizer="nope")


def test_augment_applied(utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    ds = _dataset(utterances[:1], tokenizer, augment=lambda x: x * 0 + 3)
    assert torch.all(ds[0].inputs == 3)  # type: ignore[union-attr]


def test_collate_pads_and_keeps_lengths(utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    ds = _dataset(utterances, tokenizer)
    samples = [ds[i] for i in (2, 7, 0)]
    batch = collate(samples)
    assert isinstance(batch, Batch)
    assert batch.ids == ["train-00813", "test-00001", "train-02732"]
    frames = [s.inputs.shape[0] for s in samples]  # type: ignore[union-attr]
    assert batch.input_lengths.tolist() == frames
    assert batch.inputs.shape == (3, max(frames), 80)
    assert batch.target_lengths.tolist() == [len(s.targets) for s in samples]  # type: ignore[union-attr]
    assert batch.targets.shape == (3, max(batch.target_lengths.tolist()))
    for i, s in enumerate(samples):
        assert isinstance(s, Sample)
        assert torch.equal(batch.inputs[i, : frames[i]], s.inputs)
        assert torch.all(batch.inputs[i, frames[i] :] == 0)
        n = len(s.targets)
        assert batch.targets[i, :n].tolist() == s.targets
        assert torch.all(batch.targets[i, n:] == -100)
    assert batch.texts == [s.text for s in samples]  # type: ignore[union-attr]
    assert batch.audio_seconds == pytest.approx([1.04, 2.153, 1.28], abs=2e-3)
    assert batch.skipped == []


def _bad_set(tmp_path: Path, utterances: list[Utterance]) -> list[Utterance]:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF nonsense")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    return [
        utterances[0],
        Utterance("missing", tmp_path / "missing.wav", "call noah", source="m.jsonl:2"),
        Utterance("corrupt", corrupt, "call noah"),
        Utterance("empty", empty, "call noah"),
        Utterance("oov", utterances[1].audio_path, "call zoe"),
        utterances[2],
    ]


def test_skip_bad_records_skipped_ids(tmp_path: Path, utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    utts = _bad_set(tmp_path, utterances)
    ds = _dataset(utts, tokenizer, skip_bad=True)
    samples = [ds[i] for i in range(len(ds))]
    assert [type(s).__name__ for s in samples] == ["Sample"] + ["BadSample"] * 4 + ["Sample"]
    batch = collate(samples)
    assert batch.ids == ["train-02732", "train-00813"]
    assert [sid for sid, _ in batch.skipped] == ["missing", "corrupt", "empty", "oov"]
    reasons = dict(batch.skipped)
    assert "not found" in reasons["missing"]
    assert "cannot read audio" in reasons["corrupt"]
    assert "empty" in reasons["empty"]
    assert "'z'" in reasons["oov"]
    assert all("\n" not in r for r in reasons.values())


def test_without_skip_bad_errors_propagate(
    tmp_path: Path, utterances: list[Utterance], tokenizer: CharTokenizer
) -> None:
    ds = _dataset(_bad_set(tmp_path, utterances), tokenizer)
    with pytest.raises(DsnnError, match=r"missing\.wav.*utterance missing at m\.jsonl:2"):
        ds[1]
    for i in (2, 3, 4):
        with pytest.raises(DsnnError):
            ds[i]


def test_all_bad_batch_is_empty_but_valid(tmp_path: Path, tokenizer: CharTokenizer) -> None:
    batch = collate([BadSample("a", "broken"), BadSample("b", "worse")])
    assert len(batch) == 0
    assert batch.skipped == [("a", "broken"), ("b", "worse")]
    assert batch.inputs.shape[0] == 0 and batch.input_lengths.shape == (0,)
    assert batch.targets.shape[0] == 0 and batch.target_lengths.shape == (0,)
    assert len(batch.to("cpu")) == 0


def test_loader_serves_buckets(tmp_path: Path, utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    utts = _bad_set(tmp_path, utterances)
    ds = _dataset(utts, tokenizer, skip_bad=True)
    lengths = utterance_lengths(utts, skip_bad=True)
    batches = bucket_batches(lengths, max_frames=300, shuffle=True, seed=3)
    seen, skipped = [], []
    for batch in make_loader(ds, batches):
        assert isinstance(batch, Batch)
        seen += batch.ids
        skipped += [sid for sid, _ in batch.skipped]
        if len(batch) > 1:
            assert batch.inputs.shape[0] * batch.inputs.shape[1] <= 300
    assert sorted(seen) == sorted(["train-02732", "train-00813"])
    assert sorted(skipped) == ["corrupt", "empty", "missing", "oov"]


def test_loader_with_workers(utterances: list[Utterance], tokenizer: CharTokenizer) -> None:
    ds = _dataset(utterances, tokenizer)
    batches = bucket_batches(utterance_lengths(utterances), max_frames=600, shuffle=False, seed=0)
    ids = [i for batch in make_loader(ds, batches, num_workers=2) for i in batch.ids]
    assert sorted(ids) == sorted(u.id for u in utterances)


def test_utterance_lengths(tmp_path: Path, utterances: list[Utterance]) -> None:
    from_manifest = utterance_lengths(utterances)
    assert from_manifest[0] == pytest.approx(1.28)
    no_durations = read_manifest(DATA / "kaldi")
    from_headers = utterance_lengths(no_durations)
    assert from_headers == pytest.approx(from_manifest, abs=2e-3)
    shifted = Utterance("s", utterances[0].audio_path, "x", offset=0.5)
    assert utterance_lengths([shifted])[0] == pytest.approx(0.78, abs=2e-3)
    missing = Utterance("m", tmp_path / "nope.wav", "x")
    with pytest.raises(DsnnError, match="not found"):
        utterance_lengths([missing])
    assert utterance_lengths([missing], skip_bad=True) == [0.0]


def _cost(batch: list[int], lengths: list[float]) -> int:
    return (int(max(lengths[i] for i in batch) * 100 + 1e-6) + 1) * len(batch)


def test_bucket_batches_budget_and_coverage() -> None:
    rng = np.random.default_rng(0)
    lengths = [float(x) for x in np.round(rng.uniform(0.5, 12.0, size=200), 2)]
    batches = bucket_batches(lengths, max_frames=4000, shuffle=False, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for b in batches:
        assert _cost(b, lengths) <= 4000
    # unshuffled: batches come in ascending length order, each sorted by length
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima == sorted(maxima)
    # greedy: adding the next utterance would have broken the budget
    for b, nxt in zip(batches, batches[1:], strict=False):
        longest = max(lengths[i] for i in nxt[:1] + b)
        assert (int(longest * 100 + 1e-6) + 1) * (len(b) + 1) > 4000


def test_bucket_batches_over_budget_utterance_alone() -> None:
    lengths = [1.0, 50.0, 1.0, 2.0]
    batches = bucket_batches(lengths, max_frames=1000, shuffle=False, seed=0)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert batches == [[0, 2, 3], [1]]


def test_bucket_batches_shuffle_is_deterministic() -> None:
    lengths = [float(i % 17 + 1) for i in range(100)]
    a = bucket_batches(lengths, max_frames=3000, shuffle=True, seed=11)
    b = bucket_batches(lengths, max_frames=3000, shuffle=True, seed=11)
    c = bucket_batches(lengths, max_frames=3000, shuffle=True, seed=12)
    plain = bucket_batches(lengths, max_frames=3000, shuffle=False, seed=11)
    assert a == b
    assert a != c
    assert sorted(map(tuple, a)) == sorted(map(tuple, plain))
    assert sorted(i for batch in a for i in batch) == list(range(100))


def test_bucket_batches_max_batch_size_and_errors() -> None:
    batches = bucket_batches([1.0] * 10, max_frames=100000, shuffle=False, seed=0, max_batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert bucket_batches([], max_frames=100, shuffle=True, seed=0) == []
    with pytest.raises(UsageError):
        bucket_batches([1.0], max_frames=0, shuffle=False, seed=0)
    with pytest.raises(UsageError):
        bucket_batches([1.0], max_frames=10, shuffle=False, seed=0, max_batch_size=0)


def test_manifest_offsets_reach_the_dataset(tmp_path: Path, tokenizer: CharTokenizer) -> None:
    audio = (DATA / "audio" / "test-00010.flac").absolute()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": str(audio), "text": "skip", "offset": 0.5, "duration": 0.5}))
    (utt,) = read_manifest(manifest)
    sample = _dataset([utt], tokenizer)[0]
    assert isinstance(sample, Sample)
    assert sample.audio_seconds == pytest.approx(0.5)
    assert sample.inputs.shape[0] == num_frames(8000, CFG)
