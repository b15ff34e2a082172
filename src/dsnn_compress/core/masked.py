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
from dataclasses import dataclass
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


@dataclass
class StepPlan:
    """What one joint training step runs: the levels, their loss weights and the distillation terms.

    Each trained level ``k`` adds ``weights[k] * (label_weight * loss + distill_weight * KL(dense || level)
    [sparse levels] + teacher_weight * KL(teacher || level))`` to the gradient, KL terms scaled by ``T^2``.
    """

    level_indices: Sequence[int]
    weights: Sequence[float]
    distill_weight: float = 0.0
    """In-place distillation: sparse levels learn the dense level's posteriors."""
    temperature: float = 1.0
    extra_masks: Sequence[Mapping[str, torch.Tensor]] = ()
    """Further levels given as keep-masks (continuous levels of the ``uniform`` sampling mode), loss weight 1.0."""
    teacher_scores: torch.Tensor | None = None
    """An external frozen teacher's posteriors on the batch ``[B, T, V]`` (every level learns them, dense too)."""
    teacher_weight: float = 0.0
    label_weight: float = 1.0
    """Weight of the adapter's own loss on the batch's targets (0: posteriors only, e.g. CTC without transcripts)."""

    def trained(self) -> list[int]:
        """The level indices that get a forward/backward pass (loss weight above 0), in order."""
        return sorted(i for i in self.level_indices if self.weights[i] > 0)


def train_step(runner: nn.Module, params: Mapping[str, torch.Tensor], codes: Mapping[str, torch.Tensor], batch: Any,
               plan: StepPlan) -> dict[int | str, float]:
    """Forward/backward at each level of ``plan`` (gradients accumulate into the shared parameters). Returns losses.

    One backward per level, so only one graph is alive at a time. Levels whose loss weight is 0 contribute no
    gradient and are skipped (no forward pass, no loss reported), except that the dense level still runs as the
    in-place distillation teacher. Continuous levels (``plan.extra_masks``) are trained with weight 1.0 and the
    same distillation terms; their mean loss is reported under ``"uniform"`` (the trained levels' losses are keyed
    by level index).
    """
    losses: dict[int | str, float] = {}
    dense = None
    trained = plan.trained()
    if plan.distill_weight > 0 and 0 not in trained:
        with torch.no_grad():
            dense = run_at_level(runner, params, codes, 0, batch, "loss")[1].detach()

    def total_of(index: int | None, loss: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        total = plan.label_weight * loss if plan.label_weight > 0 else scores.new_zeros(())
        if plan.distill_weight > 0 and index != 0 and dense is not None:
            total = total + plan.distill_weight * distillation_loss(dense, scores, lengths, plan.temperature)
        if plan.teacher_scores is not None and plan.teacher_weight > 0:
            total = total + plan.teacher_weight * distillation_loss(plan.teacher_scores, scores, lengths,
                                                                    plan.temperature)
        return total

    for index in trained:
        loss, scores, lengths = run_at_level(runner, params, codes, index, batch, "loss")
        if index == 0 and plan.distill_weight > 0:
            dense = scores.detach()
        total = total_of(index, loss, scores, lengths)
        (plan.weights[index] * total).backward()
        losses[index] = float(total.detach())
    extra_losses = []
    for masks in plan.extra_masks:
        loss, scores, lengths = run_with_masks(runner, params, masks, batch, "loss")
        total = total_of(None, loss, scores, lengths)
        total.backward()
        extra_losses.append(float(total.detach()))
    if extra_losses:
        losses["uniform"] = sum(extra_losses) / len(extra_losses)
    return losses


def passes_per_step(plan: StepPlan) -> int:
    """Forward passes :func:`train_step` makes for ``plan`` (the in-place dense teacher counts when it is not
    trained; an external teacher's pass is not counted here)."""
    trained = plan.trained()
    return len(trained) + len(plan.extra_masks) + (1 if plan.distill_weight > 0 and 0 not in trained else 0)
