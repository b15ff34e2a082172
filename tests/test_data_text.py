"""Text normalisers and the character tokenizer."""

from __future__ import annotations

import pytest

from dsnn_compress.data.text import NORMALIZERS, CharTokenizer, normalize_text
from dsnn_compress.errors import DsnnError, UsageError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("  Turn   on\tthe\nlights.  ", "turn on the lights"),
        ("it can't make things any worse", "it can't make things any worse"),
        ("It\u2019s fine", "it's fine"),
        ("'quoted' words", "quoted words"),
        ("rock'n'roll", "rock'n'roll"),
        ("well-known e.g. U.S.A.", "well known e g u s a"),
        ("\ufb01ne \uff21\uff22\uff23", "fine abc"),
        ("CAF\u00c9 na\u00efve", "caf\u00e9 na\u00efve"),
        ("$5 + 10% \u2014 50\u00a2?", "5 10 50"),
        ("call (sarah) [now]; ok:", "call sarah now ok"),
        ("!!!", ""),
    ],
)
def test_default_normalizer(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert normalize_text(raw, "default") == expected


@pytest.mark.parametrize(
    ("raw", "lower", "none"),
    [
        ("  Hello,   World! ", "hello, world!", "Hello,   World!"),
        ("A\tB\nC", "a b c", "A\tB\nC"),
        ("It\u2019s", "it\u2019s", "It\u2019s"),
    ],
)
def test_lower_and_none(raw: str, lower: str, none: str) -> None:
    assert normalize_text(raw, "lower") == lower
    assert normalize_text(raw, "none") == none


def test_unknown_normalizer_lists_modes() -> None:
    with pytest.raises(UsageError, match="unknown text normalizer 'fancy'") as info:
        normalize_text("x", "fancy")
    for mode in NORMALIZERS:
        assert mode in (info.value.hint or "")
    assert info.value.exit_code == 2


def test_tokenizer_build_is_sorted_and_deterministic() -> None:
    texts = ["call sarah", "it can't", "skip"]
    tok = CharTokenizer.build(texts)
    assert tok.vocabulary == ["<blank>", " ", "'", "a", "c", "h", "i", "k", "l", "n", "p", "r", "s", "t"]
    assert len(tok) == 14
    assert CharTokenizer.build(reversed(texts)).vocabulary == tok.vocabulary
    assert tok.blank_id == 0 and tok.vocabulary[0] == CharTokenizer.BLANK


def test_tokenizer_round_trip() -> None:
    tok = CharTokenizer.build(["hello world", "it's"])
    ids = tok.encode("it's hello")
    assert 0 not in ids
    assert ids[0] == tok.vocabulary.index("i")
    assert tok.decode(ids) == "it's hello"
    assert tok.decode([0, *ids, 0]) == "it's hello"
    assert tok.encode("") == []


def test_tokenizer_oov_names_characters() -> None:
    tok = CharTokenizer.build(["abc"])
    with pytest.raises(DsnnError, match=r"outside the vocabulary: 'x' 'z'"):
        tok.encode("abzxa")


def test_tokenizer_decode_rejects_bad_ids() -> None:
    tok = CharTokenizer.build(["ab"])
    with pytest.raises(DsnnError, match="token id 3"):
        tok.decode([1, 3])


def test_from_vocabulary_round_trip_and_validation() -> None:
    tok = CharTokenizer.build(["hello"])
    again = CharTokenizer.from_vocabulary(tok.vocabulary)
    assert again.vocabulary == tok.vocabulary
    assert again.encode("hello") == tok.encode("hello")
    with pytest.raises(DsnnError, match="must start with"):
        CharTokenizer.from_vocabulary(["a", "<blank>"])
    with pytest.raises(DsnnError, match="must start with"):
        CharTokenizer.from_vocabulary([])
    with pytest.raises(DsnnError, match="repeats"):
        CharTokenizer.from_vocabulary(["<blank>", "a", "b", "a"])
    with pytest.raises(DsnnError, match="not a single character"):
        CharTokenizer.from_vocabulary(["<blank>", "a", "ab"])
    with pytest.raises(DsnnError, match="repeats"):
        CharTokenizer.from_vocabulary(["<blank>", "a", "<blank>"])


def test_vocabulary_is_a_copy() -> None:
    tok = CharTokenizer.build(["ab"])
    tok.vocabulary.append("z")
    assert len(tok) == 3
