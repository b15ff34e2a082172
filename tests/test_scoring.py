"""WER / CER with substitution, deletion and insertion counts against hand-computed alignments."""

from __future__ import annotations

import random

import jiwer
import pytest

from dsnn_compress.evaluation.scoring import ErrorCounts, char_errors, word_errors


def counts(c: ErrorCounts) -> tuple[int, int, int, int]:
    return c.substitutions, c.deletions, c.insertions, c.hits


def levenshtein(ref: list[str], hyp: list[str]) -> int:
    """Plain dynamic-programming edit distance (unit costs), independent of jiwer."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def test_identical_sentence_has_no_errors():
    # the cat sat
    # the cat sat      -> 3 hits
    c = word_errors(["the cat sat"], ["the cat sat"])
    assert counts(c) == (0, 0, 0, 3)
    assert c.rate == 0.0
    assert c.reference_length == 3


def test_substitution_and_deletion():
    # ref: a b c d
    # hyp: a x c *
    #        S   D     -> S=1 D=1 I=0, H=2, WER = 2/4
    c = word_errors(["a b c d"], ["a x c"])
    assert counts(c) == (1, 1, 0, 2)
    assert c.rate == pytest.approx(0.5)


def test_insertions():
    # ref: a * b *
    # hyp: a x b y      -> I=2, H=2, WER = 2/2
    c = word_errors(["a b"], ["a x b y"])
    assert counts(c) == (0, 0, 2, 2)
    assert c.rate == pytest.approx(1.0)


def test_wer_can_exceed_one():
    # ref: a * *
    # hyp: b c d        -> S=1 I=2, N=1, WER = 3
    c = word_errors(["a"], ["b c d"])
    assert counts(c) == (1, 0, 2, 0)
    assert c.rate == pytest.approx(3.0)


def test_corpus_wer_is_pooled_not_the_mean_of_utterance_wers():
    # utt 1: ref "a"                 hyp "b"                  -> S=1, N=1 (utterance WER 1.0)
    # utt 2: ref "a b c d e f g h i" hyp identical             -> 0 errors, N=9 (utterance WER 0.0)
    # corpus WER = (1 + 0) / (1 + 9) = 0.1, while the mean of utterance WERs is 0.5
    refs = ["a", "a b c d e f g h i"]
    hyps = ["b", "a b c d e f g h i"]
    c = word_errors(refs, hyps)
    assert counts(c) == (1, 0, 0, 9)
    assert c.reference_length == 10
    assert c.rate == pytest.approx(0.1)
    mean_of_rates = sum(word_errors([r], [h]).rate for r, h in zip(refs, hyps)) / 2
    assert mean_of_rates == pytest.approx(0.5)


def test_corpus_counts_are_sums_over_utterances():
    # utt 1: ref "a b c d" hyp "a x c"   -> S=1 D=1, H=2
    # utt 2: ref "e f"     hyp "e q f z" -> I=2,     H=2
    # utt 3: ref "g h i"   hyp "g i"     -> D=1,     H=2
    c = word_errors(["a b c d", "e f", "g h i"], ["a x c", "e q f z", "g i"])
    assert counts(c) == (1, 2, 2, 6)
    assert c.rate == pytest.approx(5 / 9)


def test_empty_hypothesis_is_all_deletions():
    # ref: a b c
    # hyp: * * *        -> D=3, WER = 1
    for empty in ("", "   "):
        c = word_errors(["a b c"], [empty])
        assert counts(c) == (0, 3, 0, 0)
        assert c.rate == pytest.approx(1.0)
    # characters: "ab c" is 4 characters (space included), all deleted
    c = char_errors(["ab c"], [""])
    assert counts(c) == (0, 4, 0, 0)
    assert c.rate == pytest.approx(1.0)


def test_empty_reference_counts_hypothesis_words_as_insertions():
    # utt 1: ref ""    hyp "x y" -> I=2 (no reference words)
    # utt 2: ref "a b" hyp "a b" -> H=2
    # WER = 2 / 2
    c = word_errors(["", "a b"], ["x y", "a b"])
    assert counts(c) == (0, 0, 2, 2)
    assert c.rate == pytest.approx(1.0)
    # characters: "x y" is 3 inserted characters; "a b" 3 hits; surrounding spaces are stripped like jiwer does
    c = char_errors(["", "a b"], [" x y ", "a b"])
    assert counts(c) == (0, 0, 3, 3)
    assert c.rate == pytest.approx(1.0)


def test_only_empty_references():
    assert counts(word_errors([""], [""])) == (0, 0, 0, 0)
    assert word_errors([""], [""]).rate == 0.0
    assert word_errors(["", " "], ["", ""]).rate == 0.0
    c = word_errors([""], ["x"])
    assert counts(c) == (0, 0, 1, 0)
    assert c.rate == float("inf")
    assert counts(char_errors([""], ["xy"])) == (0, 0, 2, 0)


def test_cer_counts_spaces_as_characters():
    # ref: a b _ c d      (5 characters, "_" is the space)
    # hyp: a b * c d      -> the space is deleted: D=1, H=4, CER = 1/5
    c = char_errors(["ab cd"], ["abcd"])
    assert counts(c) == (0, 1, 0, 4)
    assert c.rate == pytest.approx(0.2)
    # ref: a b * c d
    # hyp: a b _ c d      -> an inserted space: I=1, H=4, CER = 1/4
    c = char_errors(["abcd"], ["ab cd"])
    assert counts(c) == (0, 0, 1, 4)
    assert c.rate == pytest.approx(0.25)
    # word level sees one substitution and one deletion instead ("abcd" vs "ab", "cd")
    assert counts(word_errors(["abcd"], ["ab cd"])) == (1, 0, 1, 0)


def test_cer_hand_case_over_a_corpus():
    # utt 1: ref a b c  / hyp a b d  -> S=1 H=2
    # utt 2: ref d e    / hyp d *    -> D=1 H=1
    # CER = 2 / 5
    c = char_errors(["abc", "de"], ["abd", "d"])
    assert counts(c) == (1, 1, 0, 3)
    assert c.reference_length == 5
    assert c.rate == pytest.approx(0.4)


def test_to_dict_is_json_ready():
    d = word_errors(["a b c d"], ["a x c"]).to_dict()
    assert d == {"substitutions": 1, "deletions": 1, "insertions": 0, "hits": 2, "reference_length": 4,
                 "rate": 0.5}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        word_errors(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        char_errors(["a"], ["a", "b"])


def test_random_corpora_match_an_independent_edit_distance():
    rng = random.Random(7)
    words = ["a", "b", "c", "dd", "e"]
    for _ in range(40):
        refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) for _ in refs]
        w = word_errors(refs, hyps)
        assert w.substitutions + w.deletions + w.insertions == sum(
            levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps))
        assert w.reference_length == sum(len(r.split()) for r in refs)
        assert w.rate == pytest.approx(jiwer.wer(refs, hyps))
        c = char_errors(refs, hyps)
        assert c.substitutions + c.deletions + c.insertions == sum(
            levenshtein(list(r), list(h)) for r, h in zip(refs, hyps))
        assert c.reference_length == sum(len(r) for r in refs)
        assert c.rate == pytest.approx(jiwer.cer(refs, hyps))
