"""A model ready for inference, with level switching when it came from a bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.bundle import Bundle
from ..core.finite import describe_nonfinite, nonfinite_tensors
from ..core.levels import Levels, parse_level
from ..core.sparsity import DynamicSparsity
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from .opener import Source, open_source


@dataclass
class LoadedModel:
    """An adapter ready for inference, plus level switching when it came from a bundle."""

    adapter: ModelAdapter
    path: Path
    kind: str
    """``bundle`` or ``checkpoint``."""
    sparsity: DynamicSparsity | None = None
    bundle: Bundle | None = None

    @property
    def levels(self) -> tuple[float, ...]:
        """Available levels, dense first (a plain checkpoint has only the dense level)."""
        return self.sparsity.all_levels if self.sparsity else (0.0,)

    def level_set(self) -> Levels:
        """The available levels as a :class:`~dsnn_compress.core.levels.Levels`."""
        return Levels(self.sparsity.levels) if self.sparsity else Levels()

    def set_level(self, level: float | str) -> None:
        """Switch to ``level`` (only ``0`` for a plain checkpoint)."""
        if self.sparsity is not None:
            self.sparsity.set_level(level)
            return
        if parse_level(level) != 0.0:
            raise UsageError(f"{self.path} is a dense checkpoint with no level {level}",
                             "evaluate a DSNN bundle to get sparse levels")

    def nonzero_params(self) -> int:
        """Floating-point parameters of the model that are not pruned at the active level."""
        total = sum(p.numel() for p in self.adapter.model.parameters())
        if self.sparsity is None:
            return total
        return total - self.sparsity.pruned_count()


def load_model(path: str | Path, audio_ctx: int | None = None) -> LoadedModel:
    """Rebuild the runnable model of a bundle (attached for level switching) or of a dsnn checkpoint, in eval mode.

    ``audio_ctx`` sets a Whisper model's encoder context (positions of 20 ms) instead of the one it carries.
    """
    return runnable_model(open_source(path, role="model"), audio_ctx)


def runnable_model(source: Source, audio_ctx: int | None = None) -> LoadedModel:
    """The :class:`LoadedModel` of an opened source that describes a model (DsnnError otherwise)."""
    if not source.runnable and source.kind not in ("dsnn-bundle", "dsnn-checkpoint"):
        raise DsnnError(f"{source.path} is not a .safetensors bundle or checkpoint, nor a model directory dsnn can run",
                        "pass a file written by dsnn prune / finetune / export --format checkpoint, or a supported "
                        "Hugging Face / faster-whisper model directory")
    adapter = source.adapter(audio_ctx=audio_ctx)
    check_finite_weights(adapter.model, source.path)
    if source.bundle is None:
        return LoadedModel(adapter, source.path, "checkpoint")
    sparsity = DynamicSparsity(adapter.model, source.bundle.codes, source.bundle.levels)
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


def load_checkpoint_adapter(path: str | Path) -> ModelAdapter:
    """The adapter of a self-describing dsnn checkpoint, weights loaded (DsnnError for anything else)."""
    return open_source(path, role="checkpoint").adapter()
