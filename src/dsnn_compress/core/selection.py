"""Which parameters get pruned: name-based defaults plus user include/exclude glob patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import torch

from ..errors import UsageError

HEAD_NAMES = frozenset({"lm_head", "proj_out", "ctc", "ctc_head", "ctc_proj", "output", "classifier", "head"})
"""Module names treated as the output/CTC head (matched against the module that owns the weight)."""

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")
_NORM = re.compile(r"(^|_)(norm|ln|bn|layernorm|layer_norm|batchnorm|batch_norm|groupnorm|group_norm)(\d*|_.*)$")
_POSITIONAL = ("embed", "positional", "pos_conv", "pos_emb", "position")


def is_default_prunable(name: str, tensor: torch.Tensor) -> bool:
    """The model-agnostic default rule for a checkpoint without model code.

    Prunable: floating-point weights with >= 2 dimensions whose parameter name is ``weight`` (Linear, Conv),
    ``in_proj_weight`` (``nn.MultiheadAttention``) or an RNN ``weight_ih_l*`` / ``weight_hh_l*`` (``_reverse``).
    Not prunable: biases, norms, embeddings and positional convolutions, weight-norm pieces (``weight_g`` /
    ``weight_v`` / parametrizations), and the output head (the owning module is one of :data:`HEAD_NAMES`).
    """
    if not tensor.is_floating_point() or tensor.dim() < 2:
        return False
    parts = name.split(".")
    leaf = parts[-1]
    if leaf not in ("weight", "in_proj_weight") and not _RNN_WEIGHT.match(leaf):
        return False
    modules = parts[:-1]
    if "parametrizations" in modules:
        return False
    if modules and modules[-1] in HEAD_NAMES:
        return False
    for part in modules:
        lower = part.lower()
        if _NORM.search(lower) or any(key in lower for key in _POSITIONAL):
            return False
    return True


def select_prunable(
    tensors: Mapping[str, torch.Tensor],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    defaults: Sequence[str] | None = None,
) -> list[str]:
    """Names of the tensors to prune, sorted.

    Start from ``defaults`` (a model adapter's list) or, without one, :func:`is_default_prunable`. ``include``
    patterns (``fnmatch`` globs on full names) replace that start set with every floating-point >= 2-D tensor they
    match (so a user can prune a head on purpose); ``exclude`` patterns then remove names. A pattern that matches no
    tensor at all is an error, as is an empty result.
    """
    for pattern in (*include, *exclude):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in tensors):
            raise UsageError(f"pattern {pattern!r} matches no parameter", "run `dsnn inspect` to list names")
    if include:
        chosen = set()
        for name, tensor in tensors.items():
            if any(fnmatch.fnmatchcase(name, p) for p in include):
                if not tensor.is_floating_point() or tensor.dim() < 2:
                    continue
                chosen.add(name)
        if not chosen:
            raise UsageError(
                "--include matched only tensors that cannot be pruned (1-D or not floating point)",
                "include >= 2-D weight tensors",
            )
    elif defaults is not None:
        missing = [n for n in defaults if n not in tensors]
        if missing:
            raise UsageError(f"model lists prunable tensor {missing[0]} that the checkpoint lacks")
        chosen = set(defaults)
    else:
        chosen = {name for name, tensor in tensors.items() if is_default_prunable(name, tensor)}
    chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if not chosen:
        raise UsageError("nothing left to prune", "loosen --exclude or add --include patterns for weight tensors")
    return sorted(chosen)
