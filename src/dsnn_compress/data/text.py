"""Transcript normalisation and the character tokenizer of the built-in CTC models."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

from ..errors import DsnnError, UsageError

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_STRAY_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _default(text: str) -> str:
    """NFKC, lowercase, punctuation/symbols to spaces (intra-word apostrophes kept), collapse spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch == "'" or not (category[0] in "PSC" or ch.isspace()):
            kept.append(ch)
        else:
            kept.append(" ")
    return _collapse(_STRAY_APOSTROPHE.sub(" ", "".join(kept)))


def _lower(text: str) -> str:
    """Lowercase and collapse whitespace."""
    return _collapse(text.lower())


def _none(text: str) -> str:
    """Strip surrounding whitespace only."""
    return text.strip()


_WHISPER: list[Callable[[str], str]] = []


def _whisper(text: str) -> str:
    """Whisper's English text normaliser (the Open ASR Leaderboard's), from transformers, with an empty spelling map
    (faster-whisper/CTranslate2 models ship no ``normalizer.json``): numbers, contractions, titles, punctuation.

    Tokens without a letter or digit are dropped afterwards: the library keeps the last dot of a trailing ellipsis
    (``"exactly..."`` -> ``"exactly ."``), which would count as a word a model can only miss."""
    if not _WHISPER:
        try:
            from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
        except ImportError as exc:
            raise UsageError("--normalizer whisper needs the transformers package",
                             'install the Hugging Face extra: pip install "dsnn-compress[hf]"') from exc
        _WHISPER.append(EnglishTextNormalizer({}))
    return " ".join(t for t in _WHISPER[0](text).split() if any(c.isalnum() for c in t))


NORMALIZERS: dict[str, Callable[[str], str]] = {"default": _default, "lower": _lower, "none": _none,
                                                "whisper": _whisper}
"""Transcript normalisers by name (the ``--normalizer`` choices)."""


def normalize_text(text: str, mode: str = "default") -> str:
    """Normalise a transcript with the normaliser ``mode`` (a key of :data:`NORMALIZERS`)."""
    return get_normalizer(mode)(text)


def get_normalizer(mode: str) -> Callable[[str], str]:
    """The normaliser function called ``mode``; unknown names raise :class:`UsageError`."""
    try:
        return NORMALIZERS[mode]
    except KeyError:
        raise UsageError(f"unknown text normalizer {mode!r}", hint=f"choose one of {', '.join(NORMALIZERS)}") from None


class CharTokenizer:
    """Character vocabulary for CTC: index 0 is the blank ``<blank>``, then one entry per character."""

    BLANK = "<blank>"

    def __init__(self, characters: Sequence[str]) -> None:
        chars = list(characters)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise DsnnError(f"tokenizer vocabulary entry {ch!r} is not a single character")
        duplicates = sorted({ch for ch in chars if chars.count(ch) > 1})
        if duplicates:
            raise DsnnError(f"tokenizer vocabulary repeats {', '.join(map(repr, duplicates))}")
        self._vocab = [self.BLANK, *chars]
        self._index = {ch: i for i, ch in enumerate(self._vocab)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> CharTokenizer:
        """Tokenizer over the sorted unique characters of ``texts`` (already normalised)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    @classmethod
    def from_vocabulary(cls, vocabulary: Sequence[str]) -> CharTokenizer:
        """Rebuild from :attr:`vocabulary`: blank first, then unique single characters."""
        vocab = list(vocabulary)
        if not vocab or vocab[0] != cls.BLANK:
            raise DsnnError(f"tokenizer vocabulary must start with {cls.BLANK!r}")
        if cls.BLANK in vocab[1:]:
            raise DsnnError(f"tokenizer vocabulary repeats {cls.BLANK!r}")
        return cls(vocab[1:])

    @property
    def vocabulary(self) -> list[str]:
        """All entries, blank first (a copy)."""
        return list(self._vocab)

    @property
    def blank_id(self) -> int:
        """Index of the CTC blank (always 0)."""
        return 0

    def __len__(self) -> int:
        return len(self._vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; characters outside the vocabulary raise :class:`DsnnError`."""
        try:
            return [self._index[ch] for ch in text]
        except KeyError:
            missing = sorted({ch for ch in text if ch not in self._index})
            raise DsnnError(
                f"transcript has characters outside the vocabulary: {' '.join(map(repr, missing))}",
                hint="normalise the transcripts the same way as for training, or drop those utterances",
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (blanks, if any, are dropped; no CTC collapsing is done here)."""
        out = []
        for i in ids:
            i = int(i)
            if i == 0:
                continue
            if not 0 < i < len(self._vocab):
                raise DsnnError(f"token id {i} is outside the vocabulary (size {len(self._vocab)})")
            out.append(self._vocab[i])
        return "".join(out)
