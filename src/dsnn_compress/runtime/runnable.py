"""A model ready for inference, with level switching when it came from a bundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..core.bundle import Bundle
from ..core.finite import describe_nonfinite, nonfinite_tensors
from ..core.levels import Levels, parse_level
from ..data.batch import pad_batch
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..sources.opener import Source, SourceKind, open_source
from .kernels import SparseKernels, parse_kernels
from .sparsity import DynamicSparsity
from .structured import StructuredViews, compact_adapter, views_supported
from .switch import LevelSwitch


@dataclass
class LoadedModel:
    """An adapter ready for inference, plus level switching when it came from a bundle."""

    adapter: ModelAdapter
    path: Path
    kind: Literal["bundle", "checkpoint"]
    """What the report calls the model: ``bundle`` (it switches levels) or ``checkpoint`` (dense only)."""
    sparsity: LevelSwitch | None = None
    """The level switch of a bundle (:class:`DynamicSparsity` or :class:`StructuredViews`); None = dense only."""
    bundle: Bundle | None = None
    kernels: SparseKernels | None = None
    """Sparse kernels of the pruned layers (:meth:`use_kernels`); None = dense kernels."""
    compact: bool = False
    """Structured bundles: run each level as its physically smaller model (``set_level`` swaps :attr:`adapter`)."""
    full_adapter: ModelAdapter | None = None

    @property
    def levels(self) -> tuple[float, ...]:
        """Available levels, dense first (a plain checkpoint has only the dense level)."""
        return self.sparsity.all_levels if self.sparsity else (0.0,)

    def level_set(self) -> Levels:
        """The available levels as a :class:`~dsnn_compress.core.levels.Levels`."""
        return Levels(self.sparsity.levels) if self.sparsity else Levels()

    def resolve_level(self, level: float | str) -> float:
        """The value of ``level``: a trained level or any level between dense and the largest (UsageError naming
        the range otherwise; a plain checkpoint serves only 0)."""
        if self.sparsity is not None:
            return self.sparsity.resolve_level(level)
        if parse_level(level) != 0.0:
            raise UsageError(f"{self.path} is a dense checkpoint with no level {level}",
                             "evaluate a DSNN bundle to get sparse levels")
        return 0.0

    def is_trained(self, level: float | str) -> bool:
        """False for a level between two trained levels of a bundle (served by continuous levels)."""
        return self.sparsity.is_trained(level) if self.sparsity is not None else True

    def set_level(self, level: float | str) -> None:
        """Switch to ``level``: a trained level or any value in [0, largest] (only ``0`` for a plain checkpoint)."""
        if self.compact and self.bundle is not None and self.full_adapter is not None:
            index = self.bundle.level_index(level)
            self.adapter = self.full_adapter if index == 0 else compact_adapter(self.bundle, self.full_adapter, index)
        if self.sparsity is not None:
            self.sparsity.set_level(level)
            if self.kernels is not None:  # the sparse weights depend on the level's mask: rebuilt on every switch
                self.kernels.apply(self.sparsity.level)
            return
        if parse_level(level) != 0.0:
            raise UsageError(f"{self.path} is a dense checkpoint with no level {level}",
                             "evaluate a DSNN bundle to get sparse levels")

    def use_kernels(self, mode: str, probe: Callable[[], Any] | None = None) -> None:
        """Compute pruned layers with ``dense``, ``sparse`` (CSR) or ``auto`` (timed per layer) kernels.

        ``probe`` runs the model once on typical input (``auto`` records each layer's input shapes from it, at the
        first switch to a sparse level); without one, :func:`synthetic_probe` (5 s of quiet noise) is used. The
        active level is re-applied. UsageError for ``sparse`` on a model with no pruned layer that has a sparse path.
        """
        mode = parse_kernels(mode)
        if self.kernels is not None:
            self.kernels.restore()
            self.kernels = None
        if mode == "dense":
            return
        if isinstance(self.sparsity, StructuredViews):
            raise UsageError(f"--kernels {mode}: {self.path} is a structured bundle; its levels already run as "
                             "narrower dense layers", "use --kernels dense (the default) with structured bundles")
        if self.sparsity is None:
            if mode == "sparse":
                raise UsageError(f"--kernels sparse: {self.path} is a dense checkpoint with no pruned layers",
                                 "use a DSNN bundle, or --kernels dense")
            return
        self.kernels = SparseKernels(self.adapter.model, list(self.bundle.codes) if self.bundle else [], mode,
                                     f"this {self.adapter.family} model", probe or (lambda: synthetic_probe(self)))
        self.kernels.apply(self.sparsity.level)

    def kernel_report(self) -> dict[str, Any]:
        """The kernels in use at the active level: mode, sparse layers (count and names), layers with a sparse path."""
        if self.kernels is None:
            return {"mode": "dense", "sparse_layers": 0, "layers": []}
        names = self.kernels.sparse_layers()
        return {"mode": self.kernels.mode, "sparse_layers": len(names), "layers": names}

    def nonzero_params(self) -> int:
        """Floating-point parameters of the model that are not pruned at the active level."""
        total = sum(p.numel() for p in self.adapter.model.parameters())
        if self.sparsity is None:
            return total
        if self.adapter is not self.sparsity_owner():  # the physically smaller model of the level
            return total
        return total - self.sparsity.pruned_count()

    def sparsity_owner(self) -> ModelAdapter:
        """The adapter whose model the level switch acts on (the full-size one in compact mode)."""
        return self.full_adapter or self.adapter

def load_model(path: str | Path, audio_ctx: int | None = None, kernels: str = "dense",
               probe: Callable[[], Any] | None = None, *, verify: bool = True, compact: bool = False) -> LoadedModel:
    """Rebuild the runnable model of a bundle (attached for level switching) or of a dsnn checkpoint, in eval mode.

    ``audio_ctx`` sets a Whisper model's encoder context (positions of 20 ms) instead of the one it carries.
    ``kernels`` (``dense`` | ``sparse`` | ``auto``) and ``probe``: see :meth:`LoadedModel.use_kernels`.
    ``verify`` checks the file's checksums when it has them (DsnnError naming the damaged tensors).
    """
    mode = parse_kernels(kernels)
    loaded = runnable_model(open_source(path, role="model", verify=verify), audio_ctx)
    if compact:
        if loaded.bundle is None or loaded.bundle.structured is None:
            raise UsageError(f"--compact needs a structured bundle; {path} is not one",
                             "prune with --granularity structured, or drop --compact")
        loaded.compact, loaded.full_adapter = True, loaded.adapter
    loaded.use_kernels(mode, probe)
    return loaded


def synthetic_probe(loaded: LoadedModel, seconds: float = 5.0) -> None:
    """Decode ``seconds`` of quiet seeded noise once (the input ``auto`` kernels time when given no real one)."""
    adapter = loaded.adapter
    wave = 0.01 * np.random.default_rng(0).standard_normal(int(seconds * adapter.sample_rate)).astype(np.float32)
    batch = pad_batch([adapter.prepare(wave)], [[]], [""], ["probe"])
    with torch.inference_mode():
        adapter.decode(batch)


def runnable_model(source: Source, audio_ctx: int | None = None) -> LoadedModel:
    """The :class:`LoadedModel` of an opened source that describes a model (DsnnError otherwise)."""
    if not source.runnable and source.kind not in (SourceKind.BUNDLE, SourceKind.CHECKPOINT):
        raise DsnnError(f"{source.path} is not a .safetensors bundle or checkpoint, nor a model directory dsnn can run",
                        "pass a file written by dsnn prune / finetune / export --format checkpoint, or a supported "
                        "Hugging Face / faster-whisper model directory")
    adapter = source.adapter(audio_ctx=audio_ctx)
    if hasattr(adapter, "long_form"):  # inference decodes audio longer than the model's window in chunks
        adapter.long_form = True
    check_finite_weights(adapter.model, source.path)
    if source.bundle is None:
        return LoadedModel(adapter, source.path, "checkpoint")
    if views_supported(adapter, source.bundle):
        return LoadedModel(adapter, source.path, "bundle", StructuredViews(adapter, source.bundle), source.bundle)
    sparsity = DynamicSparsity(adapter.model, source.bundle.codes, source.bundle.levels, source.bundle.allocation)
    return LoadedModel(adapter, source.path, "bundle", sparsity, source.bundle)


def check_finite_weights(model: torch.nn.Module, path: Path) -> None:
    """Refuse a model whose stored weights (parameters and persistent buffers) hold NaN or infinite values.

    Such a model outputs garbage at every level (evaluate would report 100 % WER and exit 0), so inference
    commands stop with one error naming the tensors instead.
    """
    state = model.state_dict()
    bad = nonfinite_tensors(state)
    if bad:
        raise DsnnError(f"{path} holds NaN/inf weights in {describe_nonfinite(bad, state)}, so its transcripts "
                        "would be meaningless",
                        "re-create it from a healthy checkpoint (a diverged fine-tune? lower the learning rate or "
                        "use an earlier result)")
