"""Load a model for inference from a DSNN bundle or a self-describing dsnn checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.bundle import Bundle, load_bundle
from ..core.sparsity import DynamicSparsity
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter


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

    def set_level(self, level: float | str) -> None:
        """Switch to ``level`` (only ``0`` for a plain checkpoint)."""
        if self.sparsity is not None:
            self.sparsity.set_level(level)
            return
        from ..core.bundle import parse_level

        if parse_level(level) != 0.0:
            raise UsageError(f"{self.path} is a dense checkpoint with no level {level}",
                             "evaluate a DSNN bundle to get sparse levels")

    def nonzero_params(self) -> int:
        """Floating-point parameters of the model that are not pruned at the active level."""
        total = sum(p.numel() for p in self.adapter.model.parameters())
        if self.sparsity is None or self.sparsity.level == 0.0:
            return total
        index = self.sparsity.level_index(self.sparsity.level)
        pruned = sum(int((code < index).sum()) for code in self.sparsity._codes.values())
        return total - pruned


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model of a bundle (attached for level switching) or of a dsnn checkpoint, in eval mode."""
    from ..models.registry import adapter_from_metadata, load_checkpoint_adapter

    src = Path(path)
    if not src.exists():
        raise DsnnError(f"model {src} does not exist", "pass a DSNN bundle or a dsnn checkpoint (.safetensors)")
    if src.suffix != ".safetensors" or src.is_dir():
        raise DsnnError(f"{src} is not a .safetensors bundle or checkpoint",
                        "pass a file written by dsnn prune / finetune / export --format checkpoint")
    metadata = read_safetensors_metadata(src)
    if metadata.get("format") == "dsnn-bundle":
        bundle = load_bundle(src)
        meta = bundle.metadata.get("model")
        if not isinstance(meta, dict):
            raise DsnnError(
                f"bundle {src} carries no model description, so it cannot be run",
                "prune a self-describing dsnn checkpoint (built-in family) to get a runnable bundle",
            )
        adapter = adapter_from_metadata(meta, bundle.tensors)
        adapter.model.eval()
        sparsity = DynamicSparsity(adapter.model, bundle.codes, bundle.levels)
        return LoadedModel(adapter, src, "bundle", sparsity, bundle)
    adapter = load_checkpoint_adapter(src)
    adapter.model.eval()
    return LoadedModel(adapter, src, "checkpoint")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file without loading tensors (DsnnError if unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DsnnError(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())[:160]})",
                        "the file may be truncated or corrupt") from exc
