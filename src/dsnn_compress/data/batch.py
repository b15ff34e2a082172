"""The batch type every model adapter consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """A padded batch of utterances.

    ``inputs`` is what the adapter's ``prepare`` produced per utterance, padded along time:
    ``[B, T, F]`` for log-mel models, ``[B, T]`` for raw-waveform models. ``targets`` holds token ids
    padded with ``-100`` (``[B, L]``); ``target_lengths`` are the true lengths.
    """

    inputs: torch.Tensor
    input_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    texts: list[str]
    ids: list[str]
    audio_seconds: list[float] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(utterance id, reason) of utterances dropped from this batch under ``skip_bad``."""

    def to(self, device: torch.device | str) -> Batch:
        """Move the tensors to ``device``."""
        return Batch(
            inputs=self.inputs.to(device),
            input_lengths=self.input_lengths.to(device),
            targets=self.targets.to(device),
            target_lengths=self.target_lengths.to(device),
            texts=self.texts,
            ids=self.ids,
            audio_seconds=self.audio_seconds,
            skipped=self.skipped,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def with_targets(self, targets: list[list[int]]) -> Batch:
        """The same audio with other target token ids (one list per utterance; texts are kept)."""
        if len(targets) != len(self):
            raise ValueError(f"{len(targets)} target rows for a batch of {len(self)}")
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        width = max(1, int(lengths.max()) if len(targets) else 1)
        padded = torch.full((len(targets), width), -100, dtype=torch.long)
        for i, row in enumerate(targets):
            if row:
                padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return Batch(self.inputs, self.input_lengths, padded.to(self.targets.device),
                     lengths.to(self.target_lengths.device), self.texts, self.ids, self.audio_seconds, self.skipped)


def pad_batch(
    inputs: list[torch.Tensor],
    targets: list[list[int]],
    texts: list[str],
    ids: list[str],
    audio_seconds: list[float] | None = None,
) -> Batch:
    """Pad per-utterance inputs (time first) and token id lists into a :class:`Batch`."""
    lengths = torch.tensor([x.shape[0] for x in inputs], dtype=torch.long)
    max_len = int(lengths.max()) if len(inputs) else 0
    padded = inputs[0].new_zeros((len(inputs), max_len, *inputs[0].shape[1:]))
    for i, x in enumerate(inputs):
        padded[i, : x.shape[0]] = x
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    max_t = int(target_lengths.max()) if len(targets) and int(target_lengths.max()) > 0 else 1
    padded_targets = torch.full((len(targets), max_t), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        if t:
            padded_targets[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return Batch(
        inputs=padded,
        input_lengths=lengths,
        targets=padded_targets,
        target_lengths=target_lengths,
        texts=list(texts),
        ids=list(ids),
        audio_seconds=list(audio_seconds or []),
    )
