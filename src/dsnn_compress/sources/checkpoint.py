"""The self-describing dsnn checkpoint: a safetensors state dict whose metadata describes the model.

``__metadata__`` holds ``format = dsnn-checkpoint``, ``format_version`` and ``model`` (the JSON of
``adapter.metadata()``: family, config, vocabulary, features), plus free string entries (recipe, training record,
exported level). Anything holding such a description is opened by :func:`~dsnn_compress.sources.opener.open_source`
as a runnable model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..core.compressed import compress_state_dict
from ..core.safetensors_io import write_safetensors
from ..errors import DsnnError
from ..models.base import ModelAdapter

MODEL_METADATA_KEY = "model"
"""Safetensors ``__metadata__`` field holding ``json.dumps(adapter.metadata())``."""
CHECKPOINT_FORMAT = "dsnn-checkpoint"
CHECKPOINT_FORMAT_VERSION = "1"
RESERVED_METADATA_KEYS = ("format", "format_version", MODEL_METADATA_KEY)


def check_checkpoint_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Refuse a checkpoint of another format or of a format version this dsnn cannot read."""
    fmt = metadata.get("format")
    if fmt is not None and fmt != CHECKPOINT_FORMAT:
        raise DsnnError(f"{path} is a {fmt!r} file, not a {CHECKPOINT_FORMAT}",
                        "give a checkpoint written by dsnn-compress (train/finetune/export-level)")
    version = metadata.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if fmt is not None and version != CHECKPOINT_FORMAT_VERSION:
        raise DsnnError(f"{path} is {CHECKPOINT_FORMAT} version {version}; this dsnn-compress reads version "
                        f"{CHECKPOINT_FORMAT_VERSION}", "upgrade dsnn-compress")


def in_dtypes(state: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype] | None = None
              ) -> dict[str, torch.Tensor]:
    """``state`` on the CPU, each floating-point tensor named in ``dtypes`` cast to its dtype there (the source's:
    an fp16 checkpoint stays fp16 through fine-tuning and export although the live model computes in fp32)."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        wanted = (dtypes or {}).get(name)
        if wanted is not None and tensor.is_floating_point() and wanted.is_floating_point and tensor.dtype != wanted:
            tensor = tensor.to(wanted)
        out[name] = tensor.contiguous()
    return out


def save_checkpoint(
    adapter: ModelAdapter, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None, compress: Iterable[str] | None = None,
) -> None:
    """Write ``adapter``'s model as a self-describing dsnn checkpoint, atomically (tensors in ``dtypes`` where
    given, e.g. the source's; the ``compress`` tensors in the sparse-bitmask layout of ``core.compressed``, which
    the opener decompresses)."""
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        MODEL_METADATA_KEY: json.dumps(adapter.metadata(), sort_keys=True),
    }
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_METADATA_KEYS:
            raise ValueError(f"extra checkpoint metadata may not set the reserved key {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"checkpoint metadata must map str to str (got {key!r}: {type(value).__name__})")
        metadata[key] = value
    tensors = in_dtypes(adapter.model.state_dict(), dtypes)
    if compress is not None:
        tensors, compression = compress_state_dict(tensors, compress)
        metadata.update(compression)
    try:
        write_safetensors(path, tensors, metadata)
    except OSError as exc:
        raise DsnnError(f"cannot write checkpoint {path}: {exc}", "check the output path and free space") from exc
