"""The frozen teacher of label-free (and domain-adapting) DSNN fine-tuning.

The teacher is the original model, never trained: every level of the student, the dense one included, learns its
outputs (``distillation.teacher``, ``docs/recipes.md``):

* **targets** (``distillation.labels``): the manifest's transcripts, or the teacher's own greedy transcripts as
  pseudo-labels (sequence-to-sequence models, as distil-whisper does; decoded once per utterance and kept for the
  run). A CTC student has no use for pseudo-labels: without transcripts it learns from the teacher's posteriors only;
* **posteriors**: the teacher's per-position log-probabilities on the same batch (Whisper: teacher-forced on the
  same target tokens; CTC: per frame), which the student's levels match with ``T^2 * KL(teacher || level)``.

The teacher runs as the original model runs: at its own encoder context. A Whisper student trained with a shorter
``model.audio_ctx`` thus learns to decode, from its shorter window, what the full-context model decodes (the
posteriors are per decoder token, so the two windows compare position by position).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.batch import Batch
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..sources.opener import open_source

LABEL_SOURCES = ("auto", "transcripts", "teacher")
"""``distillation.labels``: transcripts when every utterance has one (``auto``), always them, or the teacher's."""


class Teacher:
    """A frozen copy of the original model that labels batches and scores them."""

    def __init__(self, path: Path, student: ModelAdapter, device: torch.device, verify: bool = True) -> None:
        source = open_source(path, role="teacher", verify=verify)
        if source.model_meta is None:
            raise DsnnError(f"distillation.teacher {path} carries no model description, so it cannot be run",
                            "give the original model (a model directory, a dsnn checkpoint or a bundle: its dense "
                            "level)")
        self.adapter = source.adapter()  # at its own encoder context, whatever the student's
        if self.adapter.family != student.family:
            raise UsageError(f"the teacher is a {self.adapter.family} model but the student a {student.family} one",
                             "give the model the bundle was pruned from as the teacher")
        self.path = path
        self.model = self.adapter.model.to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.pseudo_labels: dict[str, list[int]] = {}
        self.seq2seq = hasattr(self.adapter, "greedy_tokens")

    def labelled(self, batch: Batch) -> Batch:
        """``batch`` with the teacher's greedy token ids as targets (decoded once per utterance id; the batch is
        unchanged for a CTC teacher, whose student learns from posteriors only)."""
        if not self.seq2seq:
            return batch
        missing = [i for i, uid in enumerate(batch.ids) if uid not in self.pseudo_labels]
        if missing:
            sub = Batch(batch.inputs[missing], batch.input_lengths[missing], batch.targets[missing],
                        batch.target_lengths[missing], [batch.texts[i] for i in missing],
                        [batch.ids[i] for i in missing])
            with torch.no_grad():
                tokens = self.adapter.greedy_tokens(sub)  # type: ignore[attr-defined]
            for i, row in zip(missing, tokens, strict=True):
                self.pseudo_labels[batch.ids[i]] = row
        return batch.with_targets([self.pseudo_labels[uid] for uid in batch.ids])

    def scores(self, batch: Batch) -> torch.Tensor:
        """The teacher's per-position log-probabilities ``[B, T, V]`` on ``batch`` (no gradient)."""
        with torch.no_grad():
            return self.adapter.log_probs(batch)[0].detach()


def check_compatible(teacher_scores: torch.Tensor, student_scores: torch.Tensor, path: Path) -> None:
    """DsnnError when the teacher's outputs cannot be compared with the student's position by position."""
    if teacher_scores.shape != student_scores.shape:
        raise DsnnError(f"the teacher {path} gives outputs of shape {tuple(teacher_scores.shape)}, the student "
                        f"{tuple(student_scores.shape)}: they cannot be compared position by position",
                        "give the model the bundle was pruned from as the teacher (same vocabulary and frame rate)")
