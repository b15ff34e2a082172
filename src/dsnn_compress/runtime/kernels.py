"""Sparse kernels for pruned layers: a level's masked weight as a ``torch.sparse`` CSR matrix.

A pruned weight at a sparse level is mostly zeros; multiplying by it as a CSR matrix skips them. On a CPU that wins
only at high sparsity and for some input shapes (``benchmarks/sparse_kernels.py``, BENCHMARKS.md), so three modes:

* ``dense``: the model as it is (the default);
* ``sparse``: every pruned layer with a sparse path computes with the CSR form of its weight at sparse levels;
* ``auto``: per layer and level, dense and CSR are timed on the input shapes the layer saw in a probe run (the
  evaluation's first batch, or a synthetic utterance), and CSR is kept only where it is clearly faster
  (:data:`AUTO_MARGIN`).

Layers with a sparse path (:func:`no_sparse_path` says why others have none): ``nn.Linear`` and pointwise
``nn.Conv1d`` (kernel 1, stride 1, no padding, one group), with float32/float64 weights. BSR (block) storage was
measured too and is slower than CSR on a CPU even for block-structured masks, so it is not offered. The dense level
always runs dense kernels (its weights have no zeros). Sparse modules are for inference: they do not propagate
gradients to the weight.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

KERNEL_MODES = ("dense", "sparse", "auto")
"""The ``--kernels`` choices."""
AUTO_MARGIN = 0.9
"""``auto`` keeps CSR for a layer only when its estimated time is below this fraction of the dense time, so that
measurement noise does not turn a layer sparse that is not faster."""
TIMING_ROWS = 512
"""``auto`` times inputs of at most this many rows and scales longer ones linearly (both kernels are linear in the
rows at that size), so that timing a long utterance's encoder does not cost as much as running it."""
TIMING_REPEATS = 5
"""Timed repetitions per kernel and shape (interleaved dense / sparse, after one warm-up each); the minimum counts."""
SHAPES_TIMED = 3
"""The most frequent input shapes of a layer that ``auto`` times (they cover its calls in practice: an encoder's
batch shape; an autoregressive decoder's one-token step, its prompt and its cross-attention on the encoder output)."""
SPARSE_DTYPES = (torch.float32, torch.float64)
"""Weight dtypes torch's CPU CSR matmul implements."""


def parse_kernels(value: str) -> str:
    """A ``--kernels`` value, checked (UsageError listing the choices otherwise)."""
    text = str(value).strip().lower()
    if text not in KERNEL_MODES:
        raise UsageError(f"--kernels {value!r} is not one of {', '.join(KERNEL_MODES)}",
                         "dense keeps the model as it is, sparse uses CSR weights, auto times both per layer")
    return text


def no_sparse_path(module: nn.Module) -> str | None:
    """None when ``module`` has a sparse path, else the layer type that has none (``"Conv1d (kernel 15)"``)."""
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype not in SPARSE_DTYPES:
        return f"{kind} ({str(weight.dtype).removeprefix('torch.')})"
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Conv1d:
        if module.kernel_size == (1,) and module.stride == (1,) and module.groups == 1 and module.padding in ((0,),
                                                                                                                "valid"):
            return None
        return f"Conv1d (kernel {module.kernel_size[0]}{', grouped' if module.groups > 1 else ''})"
    return kind


class SparseLinear(nn.Module):
    """A pruned ``nn.Linear`` or pointwise ``nn.Conv1d`` that multiplies by the CSR form of its weight.

    It holds the original module's ``weight`` and ``bias`` parameters themselves (same objects, same names in the
    state dict), so level switching writes into them as before; :meth:`refresh` rebuilds the CSR matrix from the
    weight's current values and must follow every change of level.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        reason = no_sparse_path(original)
        if reason is not None:
            raise UsageError(f"{reason} has no sparse path")
        self.weight = original.weight
        self.bias = original.bias
        self.pointwise = isinstance(original, nn.Conv1d)
        self.out_features, self.in_features = int(original.weight.shape[0]), int(original.weight.shape[1])
        self.csr: torch.Tensor = torch.empty(0)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the CSR matrix from the weight (call after the weight changed, e.g. on a level switch)."""
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.csr = self.weight.detach().reshape(self.out_features, self.in_features).to_sparse_csr()

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are stored (nonzero)."""
        return self.csr.values().numel() / max(1, self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original module's output: ``x W^T + b`` on ``[..., in]`` (``[B, C_in, T]`` for a pointwise Conv1d)."""
        if self.pointwise:
            return self._linear(x.transpose(-1, -2)).transpose(-1, -2)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.bias is None:
            out = (self.csr @ rows.T).T
        else:
            out = torch.addmm(self.bias.detach()[:, None], self.csr, rows.T).T
        return out.reshape(*x.shape[:-1], self.out_features)


def module_name_of(parameter: str) -> str | None:
    """``a.b.weight`` -> ``a.b``; None for parameters that are not a module's ``weight`` (``lstm.weight_ih_l0``)."""
    head, _, tail = parameter.rpartition(".")
    return head if tail == "weight" else None


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def rows_of(module: nn.Module, shape: tuple[int, ...]) -> int:
    """Weight-matrix rows a call with input ``shape`` multiplies (frames x batch)."""
    features = int(module.weight.shape[1])
    total = 1
    for size in shape:
        total *= int(size)
    return total // max(1, features)


def timing_input(module: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """A random input like ``shape`` with at most :data:`TIMING_ROWS` rows, and the factor that scales its time."""
    features = int(module.weight.shape[1])
    rows = rows_of(module, shape)
    kept = max(1, min(rows, TIMING_ROWS))
    timed_shape = (1, features, kept) if isinstance(module, nn.Conv1d) else (kept, features)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(timed_shape, generator=generator, dtype=module.weight.dtype).to(module.weight.device)
    return x, rows / kept


@torch.no_grad()
def time_kernels(dense: nn.Module, sparse: SparseLinear, shapes: Counter,
                 repeats: int = TIMING_REPEATS) -> tuple[float, float]:
    """Estimated seconds of ``dense`` and ``sparse`` over the calls in ``shapes`` (input shape -> calls).

    Each of the :data:`SHAPES_TIMED` most frequent shapes is timed (interleaved, minimum of ``repeats`` after a
    warm-up); the estimate is the sum over shapes of calls x time (scaled to the shape's rows).
    """
    totals = [0.0, 0.0]
    for shape, calls in shapes.most_common(SHAPES_TIMED):
        x, scale = timing_input(dense, shape)
        best = [float("inf"), float("inf")]
        modules = (dense, sparse)
        for module in modules:
            module(x)
        for _ in range(repeats):
            for i, module in enumerate(modules):
                start = time.perf_counter()
                module(x)
                best[i] = min(best[i], time.perf_counter() - start)
        for i in range(2):
            totals[i] += calls * scale * best[i]
    return totals[0], totals[1]


@dataclass
class LayerChoice:
    """What ``auto`` measured for one layer at one level (seconds for the probe's calls)."""

    layer: str
    kernel: str
    dense_seconds: float
    sparse_seconds: float
    density: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, times in microseconds."""
        return {"layer": self.layer, "kernel": self.kernel, "dense_us": round(1e6 * self.dense_seconds, 1),
                "sparse_us": round(1e6 * self.sparse_seconds, 1), "density": round(self.density, 4)}


class SparseKernels:
    """Which pruned layers of a model compute with CSR weights, per level; swaps modules in place.

    ``pruned`` names the pruned parameters (a bundle's codes). Call :meth:`apply` with the active level after every
    level switch (0 = dense): it rebuilds the sparse weights from the level's masked weights. ``auto`` needs the
    input shapes each layer sees: :meth:`profile` records them from one run of the model (``probe``, run lazily by
    :meth:`apply` when nothing was profiled yet).
    """

    def __init__(self, model: nn.Module, pruned: Iterable[str], mode: str, what: str = "this model",
                 probe: Callable[[], Any] | None = None) -> None:
        self.model = model
        self.mode = parse_kernels(mode)
        self.probe = probe
        self.layers: dict[str, nn.Module] = {}
        """Pruned layers with a sparse path (module name -> the original module)."""
        self.without_path: dict[str, str] = {}
        """Pruned layers without one (module or parameter name -> layer type)."""
        for parameter in sorted(pruned):
            name = module_name_of(parameter)
            if name is None:  # not a module's ``weight`` (LSTM ``weight_ih_l0``, ``in_proj_weight``): its owner's type
                owner = parameter.rpartition(".")[0]
                self.without_path[owner] = type(model.get_submodule(owner)).__name__
                continue
            module = model.get_submodule(name)
            if isinstance(module, SparseLinear):
                raise UsageError(f"{name} already has sparse kernels", "build the kernels once per model")
            reason = no_sparse_path(module)
            if reason is None:
                self.layers[name] = module
            else:
                self.without_path[name] = reason
        if self.mode == "sparse" and not self.layers:
            types = ", ".join(sorted(set(self.without_path.values()))) or "nothing"
            raise UsageError(f"--kernels sparse: no pruned layer of {what} has a sparse path (it prunes {types}; "
                             "sparse kernels exist for nn.Linear and pointwise nn.Conv1d with float32/float64 "
                             "weights)", "use --kernels dense (or auto, which keeps such layers dense)")
        self.shapes: dict[str, Counter] = {}
        self.choices: dict[float, dict[str, LayerChoice]] = {}
        self.sparse_now: dict[str, SparseLinear] = {}

    @torch.no_grad()
    def profile(self, run: Callable[[], Any]) -> None:
        """Run ``run`` once with the dense modules in place and record each layer's input shapes and call counts."""
        self.restore()
        shapes: dict[str, Counter] = {name: Counter() for name in self.layers}
        handles = []
        for name, module in self.layers.items():
            def record(mod: nn.Module, args: tuple, name: str = name) -> None:
                shapes[name][tuple(args[0].shape)] += 1
            handles.append(module.register_forward_pre_hook(record))
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        self.shapes = shapes
        self.choices.clear()

    def restore(self) -> None:
        """Put every original (dense) module back."""
        for name in list(self.sparse_now):
            replace_module(self.model, name, self.layers[name])
        self.sparse_now.clear()

    def apply(self, level: float) -> None:
        """Swap layers for ``level``, whose weights the model now holds (0 = dense: every layer dense)."""
        self.restore()
        if self.mode == "dense" or level == 0:
            return
        if self.mode == "sparse":
            chosen = list(self.layers)
        else:
            chosen = [name for name, c in self.decide(level).items() if c.kernel == "csr"]
        for name in chosen:
            sparse = SparseLinear(self.layers[name])
            replace_module(self.model, name, sparse)
            self.sparse_now[name] = sparse

    def decide(self, level: float) -> dict[str, LayerChoice]:
        """``auto``'s choice per layer at ``level`` (timed once per level, on the weights the model holds now)."""
        if level in self.choices:
            return self.choices[level]
        if not self.shapes and self.probe is not None:
            self.profile(self.probe)
        choices = {}
        for name, module in self.layers.items():
            sparse = SparseLinear(module)
            calls = self.shapes.get(name, Counter())
            if not calls:  # the probe never ran this layer: nothing to measure, stay dense
                choices[name] = LayerChoice(name, "dense", 0.0, 0.0, sparse.density)
                continue
            dense_s, sparse_s = time_kernels(module, sparse, calls)
            kernel = "csr" if sparse_s < AUTO_MARGIN * dense_s else "dense"
            choices[name] = LayerChoice(name, kernel, dense_s, sparse_s, sparse.density)
        self.choices[level] = choices
        return choices

    def sparse_layers(self) -> list[str]:
        """Names of the layers computing with CSR weights now."""
        return sorted(self.sparse_now)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: mode, layers with / without a sparse path (types counted)."""
        return {"mode": self.mode, "layers_with_sparse_path": len(self.layers),
                "without_sparse_path": dict(sorted(Counter(self.without_path.values()).items()))}

