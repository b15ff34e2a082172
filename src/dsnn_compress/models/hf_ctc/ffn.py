"""FFN neurons of Hugging Face transformer layers as structured groups (``docs/structured.md``).

A Hugging Face feed-forward block is two ``nn.Linear`` layers with an elementwise activation between them
(wav2vec2's ``intermediate_dense`` / ``output_dense``, Whisper's ``fc1`` / ``fc2``). Hidden neuron ``j`` is row ``j``
(and bias ``j``) of the first and column ``j`` of the second; the activations used (GELU, ReLU, SiLU) map 0 to 0, so a
neuron whose members are zero contributes exactly nothing. The helpers here are shared by the ``hf-ctc`` and
``whisper`` families: the group set of one block, per-layer sizes from the kept counts, replacing a block's two
Linears by narrower ones (physically smaller model) and running a prefix of the neurons on views of the same
weights (levels switched without copying). Nothing here imports ``transformers``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.groups import GroupSpec, Member
from ...errors import DsnnError

KIND = "ffn-neuron"
WIDTH_ATTR = "dsnn_width"
"""Attribute of a Linear whose forward runs a prefix view (the number of neurons it runs)."""


def ffn_spec(name: str, layer: int, first: str, second: str, count: int) -> GroupSpec:
    """The ``count`` hidden neurons of one block: rows + bias of ``first``, columns of ``second`` (module paths)."""
    return GroupSpec(name, KIND, layer, count, (Member(f"{first}.weight", 0), Member(f"{first}.bias", 0, scored=False),
                                                Member(f"{second}.weight", 1)))


def layer_widths(names: Sequence[str], current: Sequence[int], kept: Mapping[str, int]) -> list[int]:
    """Per-layer hidden sizes: ``kept[names[i]]`` where the level prunes set ``i``, else ``current[i]``."""
    return [int(kept.get(name, size)) for name, size in zip(names, current, strict=True)]


def uniform(widths: Sequence[int]) -> int | None:
    """The common size when every layer has the same one (None when they differ or there are none)."""
    return int(widths[0]) if widths and len(set(widths)) == 1 else None


def non_uniform_reason(fmt: str, key: str, widths: Sequence[int]) -> str:
    """The refusal text for ``fmt`` when a level keeps different FFN sizes per layer (``key``: the config field)."""
    return (f"a {fmt} config has one {key} for all layers, but this level keeps different FFN sizes per layer "
            f"({', '.join(str(int(n)) for n in widths)}); --format checkpoint holds per-layer sizes, and "
            "--allocation per-layer prunes the same number of neurons in every layer")


def resize_block(parent: nn.Module, first: str, second: str, width: int) -> None:
    """Replace ``parent.first`` / ``parent.second`` by Linears of hidden size ``width`` (fresh weights)."""
    a, b = getattr(parent, first), getattr(parent, second)
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise DsnnError(f"{type(parent).__name__}.{first}/{second} are not Linear layers",
                        "this model's feed-forward blocks cannot be resized")
    kwargs: dict[str, Any] = {"device": a.weight.device, "dtype": a.weight.dtype}
    setattr(parent, first, nn.Linear(a.in_features, width, bias=a.bias is not None, **kwargs))
    setattr(parent, second, nn.Linear(width, b.out_features, bias=b.bias is not None, **kwargs))


def _first_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    n = getattr(self, WIDTH_ATTR)
    return F.linear(x, self.weight[:n], None if self.bias is None else self.bias[:n])


def _second_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight[:, : getattr(self, WIDTH_ATTR)], self.bias)


def narrow_block(first: nn.Linear, second: nn.Linear, width: int | None) -> None:
    """Run only the first ``width`` neurons of a block on views of its weights (None or full size: the plain
    Linears again). No weight is copied or written; ``state_dict`` is unchanged."""
    if width is None or width >= first.out_features:
        for module in (first, second):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(WIDTH_ATTR, None)
        return
    if width < 1:
        raise DsnnError(f"a feed-forward block cannot run {width} neurons", "every level keeps at least one")
    for module, forward in ((first, _first_forward), (second, _second_forward)):
        setattr(module, WIDTH_ATTR, int(width))
        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


def check_ffn_dims(value: Any, layers: int, where: str, hint: str) -> list[int]:
    """``value`` as a list of ``layers`` positive integers (DsnnError naming ``where`` otherwise)."""
    if (not isinstance(value, list) or len(value) != layers
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise DsnnError(f"{where} must be a list of {layers} positive integers (per-layer FFN sizes), got {value!r}",
                        hint)
    return list(value)
