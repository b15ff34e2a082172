"""Dataset, collation and length-bucketed batching of utterances.

Batches are formed by :func:`bucket_batches` under a budget of *padded* feature frames (100 frames
per second of audio by default, matching a 10 ms hop), then served by :func:`make_loader`.

Bad utterances under ``skip_bad``: :class:`SpeechDataset` returns a :class:`BadSample` marker instead
of raising, and :func:`collate` records it in ``Batch.skipped``. When every utterance of a batch is
bad, :func:`collate` still returns a :class:`Batch`, with zero utterances (``len(batch) == 0``,
``inputs`` of shape ``[0, 0]``); training and evaluation loops must read ``batch.skipped`` and then
skip such a batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DsnnError, UsageError
from .audio import audio_duration, load_audio
from .batch import Batch, pad_batch
from .manifest import Utterance
from .text import get_normalizer

FRAMES_PER_SECOND = 100.0


@dataclass
class Sample:
    """One prepared utterance."""

    id: str
    inputs: torch.Tensor
    """The adapter's per-utterance input, time first."""
    targets: list[int]
    text: str
    """The normalised transcript."""
    audio_seconds: float


@dataclass(frozen=True)
class BadSample:
    """Marker for an utterance that failed to load or encode under ``skip_bad``."""

    id: str
    reason: str


class SpeechDataset(Dataset):
    """Utterances → :class:`Sample` (audio loaded, prepared, transcript normalised and encoded)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        prepare: Callable[[np.ndarray], torch.Tensor],
        encode: Callable[[str], list[int]],
        sample_rate: int,
        normalizer: str = "default",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.utterances = list(utterances)
        self.prepare = prepare
        self.encode = encode
        self.sample_rate = sample_rate
        self.normalizer = normalizer
        self._normalize = get_normalizer(normalizer)
        self.augment = augment
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Sample | BadSample:
        """The prepared utterance ``index``; a :class:`BadSample` on failure when ``skip_bad``."""
        utt = self.utterances[index]
        try:
            waveform = load_audio(utt.audio_path, self.sample_rate, utt.offset, utt.duration)
            # an audio-only utterance (label-free training: the teacher provides the targets) has no targets here
            text = "" if utt.text is None else self._normalize(utt.text)
            targets = [] if utt.text is None else self.encode(text)
            inputs = self.prepare(waveform)
            if self.augment is not None:
                inputs = self.augment(inputs)
        except DsnnError as exc:
            if not self.skip_bad:
                if utt.source and utt.source not in exc.message:
                    exc.message = f"{exc.message} (utterance {utt.id} at {utt.source})"
                    exc.args = (exc.message,)
                raise
            return BadSample(utt.id, exc.one_line())
        return Sample(utt.id, inputs, targets, text, waveform.shape[0] / self.sample_rate)


def _empty_batch(skipped: list[tuple[str, str]]) -> Batch:
    return Batch(
        inputs=torch.zeros((0, 0)),
        input_lengths=torch.zeros(0, dtype=torch.long),
        targets=torch.full((0, 1), -100, dtype=torch.long),
        target_lengths=torch.zeros(0, dtype=torch.long),
        texts=[],
        ids=[],
        audio_seconds=[],
        skipped=skipped,
    )


def collate(samples: Sequence[Sample | BadSample]) -> Batch:
    """Pad samples into a :class:`Batch`; :class:`BadSample` markers go to ``batch.skipped``.

    A batch whose samples are all bad comes back with zero utterances (see the module docstring).
    """
    good = [s for s in samples if isinstance(s, Sample)]
    skipped = [(s.id, s.reason) for s in samples if isinstance(s, BadSample)]
    if not good:
        return _empty_batch(skipped)
    batch = pad_batch(
        [s.inputs for s in good],
        [s.targets for s in good],
        [s.text for s in good],
        [s.id for s in good],
        [s.audio_seconds for s in good],
    )
    batch.skipped = skipped
    return batch


def utterance_lengths(utterances: Sequence[Utterance], skip_bad: bool = False) -> list[float]:
    """Length in seconds of each utterance: the manifest duration, else the audio header.

    With ``skip_bad`` an unreadable file counts as 0 s (the dataset reports it when loading);
    otherwise its :class:`DsnnError` propagates.
    """
    lengths = []
    for utt in utterances:
        if utt.duration is not None:
            lengths.append(float(utt.duration))
            continue
        try:
            lengths.append(max(0.0, audio_duration(utt.audio_path) - utt.offset))
        except DsnnError:
            if not skip_bad:
                raise
            lengths.append(0.0)
    return lengths


def bucket_batches(
    lengths: Sequence[float],
    max_frames: int,
    shuffle: bool,
    seed: int,
    frames_per_second: float = FRAMES_PER_SECOND,
    max_batch_size: int | None = None,
) -> list[list[int]]:
    """Group utterance indices into batches of similar length under a padded-frame budget.

    ``lengths`` are seconds; an utterance counts ``floor(seconds × frames_per_second) + 1`` frames
    (exactly what :func:`~.features.log_mel` gives at that frame rate), and a batch's cost is
    ``longest × count`` frames, kept ``<= max_frames`` — except that an utterance longer than the
    budget gets a batch of its own. Indices are sorted by length and filled greedily;
    with ``shuffle`` the batch order is shuffled deterministically from ``seed``. Every index appears
    exactly once.
    """
    if max_frames <= 0:
        raise UsageError(f"batch budget must be positive, got {max_frames} frames")
    if max_batch_size is not None and max_batch_size <= 0:
        raise UsageError(f"maximum batch size must be positive, got {max_batch_size}")
    frames = [int(math.floor(max(0.0, float(s)) * frames_per_second + 1e-6)) + 1 for s in lengths]
    order = sorted(range(len(frames)), key=lambda i: (frames[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = frames[i]  # ascending order: the newcomer is the longest
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or longest * (len(current) + 1) > max_frames):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def make_loader(dataset: SpeechDataset, batches: Sequence[Sequence[int]], num_workers: int = 0) -> DataLoader:
    """A DataLoader serving ``batches`` (lists of indices) of ``dataset`` through :func:`collate`."""
    return DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        collate_fn=collate,
        num_workers=num_workers,
    )
