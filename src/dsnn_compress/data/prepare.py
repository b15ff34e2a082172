"""Utterances read once for scoring: audio loaded and resampled, references normalised and checked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DsnnError
from .audio import load_audio
from .manifest import Utterance
from .text import normalize_text


@dataclass
class PreparedData:
    """Audio loaded once for all levels, with normalised references and the skipped utterances."""

    ids: list[str] = field(default_factory=list)
    waveforms: list[np.ndarray] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def prepare_data(
    utterances: Sequence[Utterance],
    sample_rate: int,
    encode_text: Callable[[str], list[int]],
    normalizer: str,
    skip_bad: bool,
    on_item: Callable[[], None] | None = None,
) -> PreparedData:
    """Load every utterance's audio at ``sample_rate``, normalise its reference and check that ``encode_text``
    (the model's tokenizer) accepts it. A bad utterance raises, or with ``skip_bad`` is listed in ``skipped``."""
    data = PreparedData()
    for utt in utterances:
        try:
            wave = load_audio(utt.audio_path, sample_rate, utt.offset, utt.duration)
            reference = normalize_text(utt.text, normalizer)
            encode_text(reference)
        except DsnnError as exc:
            if not skip_bad:
                where = f" (utterance {utt.id} at {utt.source})" if utt.source else f" (utterance {utt.id})"
                raise DsnnError(exc.message + where, exc.hint or "fix the data or pass --skip-bad") from exc
            data.skipped.append({"id": utt.id, "reason": exc.one_line()})
        else:
            data.ids.append(utt.id)
            data.waveforms.append(wave)
            data.references.append(reference)
            data.seconds.append(len(wave) / sample_rate)
        if on_item:
            on_item()
    return data
