"""Greedy CTC decoding on hand-made scores."""

from __future__ import annotations

import pytest
import torch

from dsnn_compress.models.ctc import greedy_ctc_decode


def scores(paths: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """``[B, T, V]`` log-probs whose argmax at each frame is the given token (paths padded with blank)."""
    frames = max(len(p) for p in paths)
    out = torch.full((len(paths), frames, vocab), -5.0)
    for b, path in enumerate(paths):
        for t in range(frames):
            token = path[t] if t < len(path) else 0
            out[b, t, token] = -0.1
    return out


def test_repeats_collapse() -> None:
    lp = scores([[1, 1, 1, 2, 2, 3]])
    assert greedy_ctc_decode(lp, torch.tensor([6])) == [[1, 2, 3]]


def test_blank_separates_repeated_tokens() -> None:
    lp = scores([[0, 1, 1, 0, 1, 0, 0, 2, 0, 2, 2]])
    assert greedy_ctc_decode(lp, torch.tensor([11])) == [[1, 1, 2, 2]]


def test_all_blank_is_empty() -> None:
    lp = scores([[0, 0, 0, 0]])
    assert greedy_ctc_decode(lp, torch.tensor([4])) == [[]]


def test_lengths_respected_in_padded_batch() -> None:
    # Frames past each length carry tokens that must be ignored.
    lp = scores([[1, 2, 3, 4, 4], [3, 3, 0, 3, 1], [2, 4, 1, 1, 1]])
    lengths = torch.tensor([5, 4, 1])
    assert greedy_ctc_decode(lp, lengths) == [[1, 2, 3, 4], [3, 3], [2]]


def test_zero_length_and_zero_frames() -> None:
    lp = scores([[1, 2], [2, 1]])
    assert greedy_ctc_decode(lp, torch.tensor([0, 2])) == [[], [2, 1]]
    assert greedy_ctc_decode(torch.zeros(2, 0, 5), torch.tensor([0, 0])) == [[], []]


def test_custom_blank_and_first_frame_kept() -> None:
    lp = scores([[4, 4, 1, 4, 1]])
    assert greedy_ctc_decode(lp, torch.tensor([5]), blank=4) == [[1, 1]]
    # The first frame is never treated as a repeat of anything.
    assert greedy_ctc_decode(scores([[1]]), torch.tensor([1])) == [[1]]


def test_bad_shapes() -> None:
    with pytest.raises(ValueError):
        greedy_ctc_decode(torch.zeros(3, 5), torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError):
        greedy_ctc_decode(torch.zeros(2, 3, 5), torch.tensor([3]))
