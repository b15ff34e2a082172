"""Greedy (best-path) CTC decoding."""

from __future__ import annotations

import torch


def greedy_ctc_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path decode a batch of CTC outputs.

    ``log_probs`` is ``[B, T, V]`` (any monotone scores work: logits, probabilities, log-probabilities),
    ``lengths`` ``[B]`` the number of valid frames per utterance. Per utterance the argmax path over the
    first ``lengths[b]`` frames is taken, repeated tokens are collapsed and blanks dropped. The work is
    vectorised over frames; only the final split into Python lists loops over the batch.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    batch, frames, _ = log_probs.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B] = [{batch}], got shape {tuple(lengths.shape)}")
    if frames == 0:
        return [[] for _ in range(batch)]
    best = log_probs.detach().argmax(dim=-1)  # [B, T]
    lengths = lengths.to(device=best.device, dtype=torch.long)
    valid = torch.arange(frames, device=best.device)[None, :] < lengths[:, None]
    changed = torch.ones_like(valid)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = valid & changed & (best != blank)
    tokens = best[keep].cpu().tolist()
    counts = keep.sum(dim=1).cpu().tolist()
    out: list[list[int]] = []
    start = 0
    for count in counts:
        out.append(tokens[start : start + count])
        start += count
    return out
