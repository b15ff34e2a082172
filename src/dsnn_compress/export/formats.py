"""`dsnn export`: any level of a bundle as a plain state dict, a self-describing checkpoint or ONNX."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from ..atomic import StagedOutputs, atomic_path, atomic_stream, check_output_parent, check_output_path
from ..core.bundle import Bundle
from ..core.compressed import compress_state_dict
from ..core.levels import level_number, level_tag
from ..core.safetensors_io import write_safetensors
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..models.registry import FamilyFactory, get_family
from ..runtime.structured import compact_adapter
from ..sources.checkpoint import save_checkpoint
from ..sources.opener import bundle_source, open_source
from .compressed import check_compress_format, write_compressed_directory

FORMATS = ("safetensors", "torch", "checkpoint", "onnx", "hf", "ct2")
DIRECTORY_FORMATS = ("hf", "ct2")
"""``safetensors``/``torch``: plain state dict (same keys and dtypes as the source). ``checkpoint``: a dsnn
checkpoint (safetensors + model description) that ``evaluate``/``transcribe`` load. ``onnx``: the network at that
level, inputs ``features [batch, time, mels]`` and ``lengths [batch]``, outputs ``log_probs`` and ``out_lengths``.
``hf``: a Hugging Face ``save_pretrained`` directory; ``ct2``: a faster-whisper (CTranslate2) model directory
(directories are never inferred from the name). Which of the model formats a bundle can take is its family's
``export_formats``."""


def infer_format(output: Path, requested: str | None) -> str:
    """Pick the output format from ``requested`` or the file extension."""
    if requested:
        if requested not in FORMATS:
            raise UsageError(f"unknown export format {requested!r}", f"choose one of {', '.join(FORMATS)}")
        return requested
    if output.suffix in (".pt", ".pth", ".bin"):
        return "torch"
    if output.suffix == ".onnx":
        return "onnx"
    return "safetensors"


def check_output_dir(path: str | Path, force: bool = False) -> Path:
    """Validate a directory output before any work: parent writable, no overwrite (file or dir) without force."""
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"output {out} already exists", "pass --force to replace it or choose another path")
    check_output_parent(out)
    return out


def level_output_path(output: Path, level: float) -> Path:
    """Per-level file name used by ``--level all``: ``model.onnx`` -> ``model-0.7.onnx`` / ``model-dense.onnx``."""
    return output.with_name(f"{output.stem}-{level_tag(level)}{output.suffix}")


def _adapter_at(bundle: Bundle, level: float, fmt: str) -> tuple[ModelAdapter, FamilyFactory]:
    """The bundle's model at ``level`` and its family, after checking that the family can be written as ``fmt``.
    The model is built by the opener (:meth:`~dsnn_compress.sources.opener.Source.adapter`) with the level's
    weights; a structured bundle's sparse level is then its physically smaller model."""
    meta = bundle.metadata.get("model")
    if not isinstance(meta, dict):
        raise DsnnError("this bundle carries no model description, so only plain state dicts can be exported",
                        "use --format safetensors or torch")
    family = get_family(str(meta.get("family")), DsnnError)
    formats = tuple(getattr(family, "export_formats", ("checkpoint",)))
    if fmt not in formats:
        name = meta.get("family")
        raise UsageError(f"--format {fmt} is not available for {name} models",
                         "choose one of: " + ", ".join(f"--format {f}" for f in ("safetensors", "torch", *formats)))
    adapter = bundle_source(bundle).adapter(purpose="export", tensors=bundle.state_dict_at(level))
    if bundle.structured is not None and bundle.level_index(level) > 0:  # the level physically smaller
        adapter = compact_adapter(bundle, adapter, bundle.level_index(level), fmt)
    return adapter, family


def export_onnx(model: torch.nn.Module, output: Path, n_mels: int, opset: int = 18) -> None:
    """Export ``model(features, lengths)`` to ONNX with dynamic batch and time axes (atomic)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise DsnnError("ONNX export needs the onnx and onnxscript packages",
                        'install them with: pip install "dsnn-compress[onnx]"') from None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    features = torch.randn(2, 64, n_mels)
    lengths = torch.tensor([64, 40])
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=1, max=1_000_000)
    with atomic_path(output) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (features, lengths), str(tmp), dynamo=True, opset_version=opset,
                              input_names=["features", "lengths"], output_names=["log_probs", "out_lengths"],
                              dynamic_shapes={"features": {0: batch, 1: time}, "lengths": {0: batch}},
                              external_data=False)
        except Exception as exc:  # noqa: BLE001 - models the graph exporter cannot trace (packed LSTMs) use TorchScript
            os_error = _os_error_in(exc)
            if os_error is not None:  # a full disk or a file-size limit is not a tracing problem: report it
                raise os_error from None
            torch.onnx.export(model, (features, lengths), str(tmp), dynamo=False, opset_version=17,
                              input_names=["features", "lengths"], output_names=["log_probs", "out_lengths"],
                              dynamic_axes={"features": {0: "batch", 1: "time"}, "lengths": {0: "batch"},
                                            "log_probs": {0: "batch", 1: "frames"}, "out_lengths": {0: "batch"}})


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError in ``exc``'s cause/context chain (the ONNX exporter wraps write failures), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def source_dtype(bundle: Bundle) -> torch.dtype | None:
    """The floating-point dtype of the bundle's weights (the most common one), which directory exports keep."""
    counts: dict[torch.dtype, int] = {}
    for tensor in bundle.tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None


def export_level(bundle: Bundle, level: float | str, output: str | Path, fmt: str | None = None,
                 compress: bool = False) -> Path:
    """Write ``level`` of ``bundle`` (a trained level or any level in [0, largest]) to ``output`` in ``fmt``
    (default: from the extension); ``compress`` stores the pruned weights in the sparse-bitmask layout
    (:mod:`.compressed`)."""
    out = Path(output)
    fmt = infer_format(out, fmt)
    value = bundle.resolve_level(level)
    if compress:
        check_compress_format(fmt)
    if fmt == "safetensors":
        metadata = {"format": "pt", "dsnn_level": f"{value:g}"}
        source = bundle.metadata.get("source")
        if isinstance(source, dict) and source.get("sha256"):
            metadata["dsnn_source_sha256"] = str(source["sha256"])
        state = bundle.state_dict_at(value)
        if compress:
            state, extra = compress_state_dict(state, bundle.codes)
            metadata.update(extra)
        write_safetensors(out, state, metadata)
    elif fmt == "torch":
        with atomic_stream(out) as fh:  # a full disk is one ENOSPC error, not torch's "[enforce fail at ...]"
            torch.save(bundle.state_dict_at(value), fh)
    elif fmt == "checkpoint":
        extra = {"dsnn_level": f"{value:g}",
                 "exported_from": json.dumps({"levels": list(bundle.levels), "level": value}, sort_keys=True)}
        save_checkpoint(_adapter_at(bundle, value, fmt)[0], out, extra,
                        {name: tensor.dtype for name, tensor in bundle.tensors.items()},
                        compress=list(bundle.codes) if compress else None)
    elif fmt in DIRECTORY_FORMATS and compress:
        adapter, family = _adapter_at(bundle, value, fmt)
        write_compressed_directory(family.save_hf, adapter, out, value, source_dtype(bundle), bundle.codes,
                                   level_sparsity(bundle, value))
    elif fmt in DIRECTORY_FORMATS:
        adapter, family = _adapter_at(bundle, value, fmt)
        getattr(family, f"save_{fmt}")(adapter, out, level=value, dtype=source_dtype(bundle))
    else:
        adapter, _ = _adapter_at(bundle, value, fmt)
        n_mels = int(adapter.metadata().get("features", {}).get("n_mels", 80))
        export_onnx(adapter.model, out, n_mels)
    return out


def level_sparsity(bundle: Bundle, level: float) -> float:
    """Fraction of all floating-point parameters that ``level`` prunes."""
    total = sum(t.numel() for t in bundle.tensors.values() if t.is_floating_point())
    pruned = sum(int((~mask).sum()) for mask in bundle.masks_at(level).values())
    return pruned / total if total else 0.0


def export_levels(bundle: Bundle, level: float | str, output: str | Path, fmt: str | None = None,
                  compress: bool = False) -> list[Path]:
    """Export one level, or with ``level == "all"`` every level to :func:`level_output_path` files.

    All or nothing: every file (or directory) is written under a temporary name first and the set is moved into
    place only when all levels succeeded; on any failure none of them is left (see :class:`StagedOutputs`).
    """
    out = Path(output)
    every = isinstance(level, str) and level.strip().lower() == "all"
    wanted = list(bundle.all_levels) if every else [level]
    targets = [level_output_path(out, lv) for lv in bundle.all_levels] if every else [out]
    resolved = infer_format(out, fmt)
    with StagedOutputs() as staged:
        for lv, target in zip(wanted, targets, strict=True):
            export_level(bundle, lv, staged.file(target), resolved, compress)
    return targets


def export_bundle(bundle_path: str | Path, level: str, output: str | Path, fmt: str | None = None,
                  force: bool = False, compress: bool = False, *, verify: bool = True) -> list[Path]:
    """``dsnn export``: check the level and every output path first, then write the level(s) of the bundle
    (``verify``: after checking the bundle's checksums)."""
    out = Path(output)
    every = level.strip().lower() == "all"
    if not every:
        level_number(level)  # a bad spelling fails before the bundle is read
    resolved = infer_format(out, fmt)
    if compress:
        check_compress_format(resolved)
    check = check_output_dir if resolved in DIRECTORY_FORMATS else check_output_path
    if every:
        check_output_parent(out)  # the file names depend on the bundle's levels: checked once it is read
    else:
        check(out, force)
    bundle = open_source(bundle_path, role="bundle", verify=verify).require_bundle()
    if every:
        for target in (level_output_path(out, lv) for lv in bundle.all_levels):
            check(target, force)
    else:
        bundle.resolve_level(level)
    return export_levels(bundle, level, out, resolved, compress)
