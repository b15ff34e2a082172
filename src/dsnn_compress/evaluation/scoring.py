"""Corpus-level WER and CER with substitution / deletion / insertion counts (jiwer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jiwer


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts of one corpus at one granularity (words or characters)."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def reference_length(self) -> int:
        """Tokens in the references: ``S + D + H``."""
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        """``(S + D + I) / N`` (0 when the references are empty and nothing was inserted)."""
        errors = self.substitutions + self.deletions + self.insertions
        if self.reference_length == 0:
            return 0.0 if errors == 0 else float("inf")
        return errors / self.reference_length

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready counts plus the rate."""
        return {**asdict(self), "reference_length": self.reference_length, "rate": self.rate}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorCounts:
        """The counts of a :meth:`to_dict` record (``reference_length`` and ``rate`` follow from them)."""
        return cls(int(data["substitutions"]), int(data["deletions"]), int(data["insertions"]), int(data["hits"]))


def _counts(output: jiwer.WordOutput | jiwer.CharacterOutput) -> ErrorCounts:
    return ErrorCounts(output.substitutions, output.deletions, output.insertions, output.hits)


def _non_empty(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str], int]:
    """jiwer refuses empty references; count the words of hypotheses for those as insertions instead."""
    refs, hyps, extra_insertions = [], [], 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        if ref.strip():
            refs.append(ref)
            hyps.append(hyp)
        else:
            extra_insertions += len(hyp.split())
    return refs, hyps, extra_insertions


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Corpus word error counts (references and hypotheses already normalised)."""
    refs, hyps, extra = _non_empty(references, hypotheses)
    if not refs:
        return ErrorCounts(0, 0, extra, 0)
    counts = _counts(jiwer.process_words(refs, [h if h.strip() else "" for h in hyps]))
    return ErrorCounts(counts.substitutions, counts.deletions, counts.insertions + extra, counts.hits)


def char_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Corpus character error counts; spaces count as characters (jiwer's CER)."""
    refs, hyps, _ = _non_empty(references, hypotheses)
    # jiwer strips surrounding whitespace; do the same for hypotheses of empty references
    extra = sum(len(h.strip()) for r, h in zip(references, hypotheses, strict=True) if not r.strip())
    if not refs:
        return ErrorCounts(0, 0, extra, 0)
    counts = _counts(jiwer.process_characters(refs, hyps))
    return ErrorCounts(counts.substitutions, counts.deletions, counts.insertions + extra, counts.hits)
