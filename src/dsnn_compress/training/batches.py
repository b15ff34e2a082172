"""The training data as a resumable stream of batches, and resume-safe SpecAugment.

Each epoch's batches are length-bucketed and shuffled from ``seed + epoch`` (so they are a pure function of the
epoch), and under ``torchrun`` every global batch is split across the ranks. A :class:`BatchStream` therefore only
needs ``(epoch, position)`` to continue exactly where a checkpoint left off. SpecAugment draws from a generator
derived from ``(seed, step, utterance)``, never from the global one, for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from ..data.batch import Batch
from ..data.dataset import SpeechDataset, bucket_batches, collate, utterance_lengths
from ..data.features import spec_augment
from ..data.manifest import read_manifest
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from .ddp import DistInfo
from .recipe import Recipe


def epoch_batches(lengths: Sequence[float], recipe: Recipe, epoch: int, dist_info: DistInfo) -> list[list[int]]:
    """This rank's batches of ``epoch`` (each global batch split across ranks; too-small batches dropped)."""
    batches = bucket_batches(lengths, recipe.data.batch_frames, shuffle=True, seed=recipe.training.seed + epoch,
                             max_batch_size=recipe.data.max_batch_size)
    if dist_info.world == 1:
        return batches
    return [b[dist_info.rank::dist_info.world] for b in batches if len(b) >= dist_info.world]


def augment(batch: Batch, seed: int, step: int) -> Batch:
    """SpecAugment each utterance with a generator derived from (seed, step, position): resume-safe."""
    if batch.inputs.dim() != 3:  # raw-waveform models (hf-ctc) have no [T, F] features; they mask inside the model
        return batch
    inputs = batch.inputs.clone()
    for i in range(len(batch)):
        length = int(batch.input_lengths[i])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + i)
        inputs[i, :length] = spec_augment(batch.inputs[i, :length], gen)
    batch.inputs = inputs
    return batch


class BatchStream:
    """This rank's training batches, epoch after epoch; ``epoch`` and ``position`` say where it stands.

    ``position`` counts the batches of the current epoch already handed out, so ``seek(epoch, position)`` after a
    restart continues with the next batch of the interrupted run.
    """

    def __init__(self, recipe: Recipe, adapter: ModelAdapter, dist_info: DistInfo) -> None:
        self.recipe, self.dist_info = recipe, dist_info
        utterances = read_manifest(recipe.data.train, require_text=False)
        missing = sum(u.text is None for u in utterances)
        self.transcribed = missing == 0  # else the teacher provides the targets
        if missing and recipe.distillation.teacher is None:
            raise UsageError(f"{missing} of {len(utterances)} utterances of data.train {recipe.data.train} have no "
                             "transcript ('text'), and there is no teacher to learn from",
                             "give the original model as --teacher SOURCE (distillation.teacher) for label-free "
                             "fine-tuning, or add transcripts")
        if missing and recipe.distillation.labels == "transcripts":
            raise UsageError(f"distillation.labels is transcripts, but {missing} of {len(utterances)} utterances of "
                             f"data.train {recipe.data.train} have none", "set distillation.labels: auto or teacher")
        self.lengths = utterance_lengths(utterances, skip_bad=recipe.data.skip_bad)
        self.dataset = SpeechDataset(utterances, adapter.prepare, adapter.encode_text, adapter.sample_rate,
                                     normalizer=adapter.normalizer,
                                     skip_bad=recipe.data.skip_bad)
        self.per_epoch = len(epoch_batches(self.lengths, recipe, 0, dist_info))
        if self.per_epoch == 0:
            raise DsnnError("the training data gives no batch", "use more data or a larger data.batch_frames")
        self.epoch = self.position = 0
        self._iterator: Iterator[Batch] | None = None  # opened at (epoch, position) by the first next_batch()

    def seek(self, epoch: int, position: int) -> None:
        """Continue from batch ``position`` of ``epoch``."""
        self.epoch, self.position = epoch, position
        self._iterator = None

    def _open(self) -> Iterator[Batch]:
        batches = epoch_batches(self.lengths, self.recipe, self.epoch, self.dist_info)
        generator = torch.Generator().manual_seed(self.recipe.training.seed + self.epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches[self.position:], collate_fn=collate,
                            num_workers=self.recipe.data.num_workers, generator=generator, persistent_workers=False)
        return iter(loader)

    def next_batch(self) -> Batch:
        """The next batch, moving on to the next epoch when this one is used up."""
        while True:
            if self._iterator is None:
                self._iterator = self._open()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self.seek(self.epoch + 1, 0)
                continue
            self.position += 1
            return batch
