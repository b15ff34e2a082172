"""The DSNN masked forward: run a network at a level on the shared dense weights, differentiably.

For level ``k`` the forward uses ``weight * (code >= k)`` through ``torch.func.functional_call``, so a pruned weight
gets gradient only from the levels where it is alive: what joint multi-level training needs. (Run-time switching
for inference rewrites the weights in place instead: :mod:`~dsnn_compress.runtime.sparsity`.)

The functions here know nothing of models or data. A *runner* is any ``nn.Module`` whose ``forward(batch, mode)``
returns, for ``mode == "loss"``, a tuple ``(loss, scores, lengths)``: a scalar loss and the ``[B, T, V]`` scores
(log-probabilities or logits) over ``lengths`` valid positions that distillation compares. Its parameters named
``prefix + name`` are the ones ``codes`` prune (``models.base.AdapterRunner`` puts an adapter's model under
``model.``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def masked_parameters(
    params: Mapping[str, torch.Tensor], codes: Mapping[str, torch.Tensor], level_index: int
) -> dict[str, torch.Tensor]:
    """``{name: weight * mask}`` for the coded parameters at ``level_index`` (differentiable; for functional_call)."""
    if level_index == 0:
        return {n: params[n] for n in codes}
    return {n: params[n] * (code >= level_index).to(params[n].dtype) for n, code in codes.items()}


def run_with_masks(runner: nn.Module, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                   batch: Any, mode: str, prefix: str = "model.") -> Any:
    """``runner(batch, mode)`` with each parameter named in ``masks`` multiplied by its boolean keep-mask
    (differentiable; used for continuous levels, whose masks are not a keep-code threshold)."""
    masked = {f"{prefix}{n}": params[n] * m.to(params[n].dtype) for n, m in masks.items()}
    return functional_call(runner, masked, (batch, mode), strict=False)


def run_at_level(runner: nn.Module, params: Mapping[str, torch.Tensor], codes: Mapping[str, torch.Tensor],
                 index: int, batch: Any, mode: str, prefix: str = "model.") -> Any:
    """``runner(batch, mode)`` with the coded weights masked to level ``index`` (0 = dense: a plain call)."""
    if index == 0 or not codes:
        return runner(batch, mode)
    masked = {f"{prefix}{n}": t for n, t in masked_parameters(params, codes, index).items()}
    return functional_call(runner, masked, (batch, mode), strict=False)


def distillation_loss(teacher: torch.Tensor, student: torch.Tensor, lengths: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of per-position posteriors ``[B, T, V]``, averaged over valid positions."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    per_frame = (t.exp() * (t - s)).sum(-1)
    valid = torch.arange(per_frame.shape[1], device=per_frame.device)[None, :] < lengths[:, None]
    return temperature**2 * (per_frame * valid).sum() / valid.sum().clamp(min=1)


def train_step(
    runner: nn.Module,
    params: Mapping[str, torch.Tensor],
    codes: Mapping[str, torch.Tensor],
    batch: Any,
    level_indices: Sequence[int],
    weights: Sequence[float],
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    extra_masks: Sequence[Mapping[str, torch.Tensor]] = (),
) -> dict[int | str, float]:
    """Forward/backward at each level (gradients accumulate into the shared parameters). Returns losses.

    Each level's loss is ``weight * (loss + distill_weight * distillation_loss(dense, level))``, one backward per
    level so only one graph is alive at a time. Levels whose loss weight is 0 contribute no gradient and are skipped
    (no forward pass, no loss reported), except that the dense level still runs as the distillation teacher.

    ``extra_masks`` are further levels given as keep-masks (continuous levels of the ``uniform`` sampling mode),
    each trained with loss weight 1.0 and the same distillation; their mean loss is reported under the key
    ``"uniform"`` (the trained levels' losses are keyed by level index).
    """
    losses: dict[int | str, float] = {}
    teacher = None
    level_indices = [i for i in level_indices if weights[i] > 0]
    if distill_weight > 0 and 0 not in level_indices:
        with torch.no_grad():
            teacher = run_at_level(runner, params, codes, 0, batch, "loss")[1].detach()
    for index in sorted(level_indices):
        loss, scores, lengths = run_at_level(runner, params, codes, index, batch, "loss")
        total = loss
        if distill_weight > 0:
            if index == 0:
                teacher = scores.detach()
            else:
                total = total + distill_weight * distillation_loss(teacher, scores, lengths, temperature)
        (weights[index] * total).backward()
        losses[index] = float(total.detach())
    extra_losses = []
    for masks in extra_masks:
        loss, scores, lengths = run_with_masks(runner, params, masks, batch, "loss")
        total = loss
        if distill_weight > 0:
            total = total + distill_weight * distillation_loss(teacher, scores, lengths, temperature)
        total.backward()
        extra_losses.append(float(total.detach()))
    if extra_losses:
        losses["uniform"] = sum(extra_losses) / len(extra_losses)
    return losses


def passes_per_step(level_indices: Sequence[int], weights: Sequence[float], distill_weight: float,
                    extra_levels: int = 0) -> int:
    """Forward passes :func:`train_step` makes for these levels (the dense teacher counts when it is not trained)
    plus ``extra_levels`` mask-given levels."""
    trained = [i for i in level_indices if weights[i] > 0]
    return len(trained) + extra_levels + (1 if distill_weight > 0 and 0 not in trained else 0)
