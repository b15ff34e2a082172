"""A model ready for inference, with level switching when it came from a bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.bundle import Bundle
from ..core.levels import Levels, parse_level
from ..core.sparsity import DynamicSparsity
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from .opener import Source, open_source
from .structured_runtime import StructuredViews, compact_adapter, views_supported


@dataclass
class LoadedModel:
    """An adapter ready for inference, plus level switching when it came from a bundle."""

    adapter: ModelAdapter
    path: Path
    kind: str
    """``bundle`` or ``checkpoint``."""
    sparsity: DynamicSparsity | StructuredViews | None = None
    bundle: Bundle | None = None
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

    def set_level(self, level: float | str) -> None:
        """Switch to ``level`` (only ``0`` for a plain checkpoint)."""
        if self.compact and self.bundle is not None and self.full_adapter is not None:
            index = self.bundle.level_index(level)
            self.adapter = self.full_adapter if index == 0 else compact_adapter(self.bundle, self.full_adapter, index)
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
        if self.adapter is not self.sparsity_owner():  # the physically smaller model of the level
            return total
        return total - self.sparsity.pruned_count()

    def sparsity_owner(self) -> ModelAdapter:
        """The adapter whose model the level switch acts on (the full-size one in compact mode)."""
        return self.full_adapter or self.adapter


def load_model(path: str | Path, audio_ctx: int | None = None, compact: bool = False) -> LoadedModel:
    """Rebuild the runnable model of a bundle (attached for level switching) or of a dsnn checkpoint, in eval mode.

    ``audio_ctx`` sets a Whisper model's encoder context (positions of 20 ms) instead of the one it carries.
    """
    loaded = runnable_model(open_source(path, role="model"), audio_ctx)
    if compact:
        if loaded.bundle is None or loaded.bundle.structured is None:
            raise UsageError(f"--compact needs a structured bundle; {path} is not one",
                             "prune with --granularity structured, or drop --compact")
        loaded.compact, loaded.full_adapter = True, loaded.adapter
    return loaded


def runnable_model(source: Source, audio_ctx: int | None = None) -> LoadedModel:
    """The :class:`LoadedModel` of an opened source that describes a model (DsnnError otherwise)."""
    if not source.runnable and source.kind not in ("dsnn-bundle", "dsnn-checkpoint"):
        raise DsnnError(f"{source.path} is not a .safetensors bundle or checkpoint, nor a model directory dsnn can run",
                        "pass a file written by dsnn prune / finetune / export --format checkpoint, or a supported "
                        "Hugging Face / faster-whisper model directory")
    adapter = source.adapter(audio_ctx=audio_ctx)
    if source.bundle is None:
        return LoadedModel(adapter, source.path, "checkpoint")
    if views_supported(adapter, source.bundle):
        return LoadedModel(adapter, source.path, "bundle", StructuredViews(adapter, source.bundle), source.bundle)
    sparsity = DynamicSparsity(adapter.model, source.bundle.codes, source.bundle.levels)
    return LoadedModel(adapter, source.path, "bundle", sparsity, source.bundle)


def load_checkpoint_adapter(path: str | Path) -> ModelAdapter:
    """The adapter of a self-describing dsnn checkpoint, weights loaded (DsnnError for anything else)."""
    return open_source(path, role="checkpoint").adapter()
