"""Attach a bundle's keep codes to a live ``torch.nn.Module`` and switch levels at run time.

Two switching designs were measured (``benchmarks/switching.py``, numbers in BENCHMARKS.md):

* in-place (this module's :class:`DynamicSparsity`): the dense values of pruned tensors are kept aside and
  ``set_level`` writes ``dense * mask`` into the parameters once; every forward afterwards is a plain forward.
* masked view (:mod:`~dsnn_compress.core.masked`): every forward multiplies weights by the
  level's mask. Gradients then flow to shared dense weights only through the weights alive at that level, which
  is what joint multi-level training needs, so training uses this one.

Deployments switch rarely and run often, so the runtime switch is in-place. :class:`DynamicSparsity` is one of
the two :class:`~dsnn_compress.runtime.switch.LevelSwitch` implementations.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.bundle import Bundle
from ..core.continuous import keep_masks
from ..core.levels import LevelLookups
from ..errors import DsnnError


class DynamicSparsity(LevelLookups):
    """A module bound to keep codes; ``set_level`` rewrites pruned parameters in place.

    Create with :func:`attach`. The module's current values are taken as the dense weights. Any level in
    [0, largest trained level] is served: between two trained levels the masks come from
    :func:`~dsnn_compress.core.continuous.keep_masks` (``allocation`` orders them), nested with the trained ones.
    """

    def __init__(self, module: torch.nn.Module, codes: Mapping[str, torch.Tensor], levels: tuple[float, ...],
                 allocation: str = "per-layer"):
        params = dict(module.named_parameters())
        missing = [n for n in codes if n not in params]
        if missing:
            raise DsnnError(f"module has no parameter {missing[0]} that the bundle prunes",
                            "attach the bundle to the model it was made from")
        for name, code in codes.items():
            if tuple(code.shape) != tuple(params[name].shape):
                raise DsnnError(f"parameter {name} has shape {tuple(params[name].shape)}, codes {tuple(code.shape)}")
        self.module = module
        self.levels = levels
        self.allocation = allocation
        self._params = {n: params[n] for n in codes}
        self._codes = {n: c.to(params[n].device) for n, c in codes.items()}
        self._dense = {n: p.detach().clone() for n, p in self._params.items()}
        self._level = 0.0
        self._masks: dict[str, torch.Tensor] | None = None
        """Keep-masks of the active level when it lies between trained levels (None at a trained level)."""

    @property
    def level(self) -> float:
        """The active level (a trained level or a value between two of them)."""
        return self._level

    def _masks_at(self, value: float) -> dict[str, torch.Tensor] | None:
        if self.is_trained(value):
            return None
        return keep_masks(self._dense, self._codes, self.levels, value, self.allocation)

    @torch.no_grad()
    def set_level(self, level: float | str) -> None:
        """Switch the module to ``level`` (any value in [0, largest]): pruned weights become exactly zero, others
        take their dense values."""
        value = self.resolve_level(level)
        masks = self._masks_at(value)
        index = self.level_index(value) if masks is None else -1
        for name, param in self._params.items():
            dense = self._dense[name]
            if index == 0:
                param.copy_(dense)
            else:
                keep = self._codes[name] >= index if masks is None else masks[name]
                # written straight into the parameter: no temporary, about 2x faster than where() + copy_()
                torch.where(keep, dense, torch.zeros((), dtype=dense.dtype), out=param.data)
        self._level, self._masks = value, masks

    def pruned_count(self) -> int:
        """How many weights the active level prunes (0 at dense)."""
        if self._masks is not None:
            return sum(int((~mask).sum()) for mask in self._masks.values())
        index = self.level_index(self._level)
        if index == 0:
            return 0
        return sum(int((code < index).sum()) for code in self._codes.values())

    def state_dict_at(self, level: float | str) -> dict[str, torch.Tensor]:
        """The module's state dict at ``level`` (any value in [0, largest]) without changing the active level."""
        value = self.resolve_level(level)
        masks = self._masks_at(value)
        index = self.level_index(value) if masks is None else -1
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for name, dense in self._dense.items():
            keep = self._codes[name] >= index if masks is None else masks[name]
            state[name] = dense.clone() if index == 0 else torch.where(keep, dense, torch.zeros((), dtype=dense.dtype))
        return state

    def detach(self) -> torch.nn.Module:
        """Restore the dense weights and return the plain module."""
        self.set_level(0.0)
        return self.module


def attach(module: torch.nn.Module, bundle: Bundle, load_weights: bool = True) -> DynamicSparsity:
    """Bind ``bundle``'s codes to ``module`` (loading the bundle's dense weights first unless told not to)."""
    if load_weights:
        result = module.load_state_dict(bundle.tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            name = (result.missing_keys or result.unexpected_keys)[0]
            raise DsnnError(f"bundle and module disagree on tensor {name}",
                            "attach the bundle to the model it was made from")
    return DynamicSparsity(module, bundle.codes, bundle.levels, bundle.allocation)
