"""Readers of the weight files a source may hold: torch files, Hugging Face directories (safetensors files are
read by :mod:`~dsnn_compress.core.safetensors_io`). Which reader applies is decided by :mod:`.opener` alone.

Supported: ``.safetensors``; ``.pt/.pth/.bin/.ckpt`` via ``torch.load(weights_only=True)`` (pickled code is
refused), with ``state_dict`` / ``model`` / ``module`` nesting unwrapped; a Hugging Face ``save_pretrained``
directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, sharded or not), whose small text
files (configs, vocabularies) are kept for later steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.compressed import decompress_state_dict
from ..core.safetensors_io import open_safetensors
from ..errors import DsnnError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_KEPT_SUFFIXES = (".json", ".txt", ".model", ".py.txt")
HF_KEPT_MAX_BYTES = 4 * 1024 * 1024
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def sha256_of(buffer: Any, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a buffer (bytes, an mmap) read in slices."""
    digest = hashlib.sha256()
    with memoryview(buffer) as view:
        for start in range(0, len(view), chunk):
            digest.update(view[start : start + chunk])
    return digest.hexdigest()


def read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], list[str], Callable[[], str]]:
    """Tensors of a ``torch.save`` file, loaded with ``weights_only=True`` and unwrapped from common nesting, and a
    function giving the sha256 of the bytes that were loaded (the file is mapped once, so a concurrent replace of
    the path cannot mix two files)."""
    try:
        with open(path, "rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            obj = torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise DsnnError(
                f"{path} is not a readable torch checkpoint: it is corrupt, or holds pickled objects beyond tensors "
                "(which dsnn refuses to unpickle)",
                "re-save only the weights: torch.save(model.state_dict(), path) or save_file(...) from safetensors",
            ) from exc
        raise DsnnError(
            f"{path} contains pickled Python objects ({found.group(1)}), which dsnn refuses to unpickle",
            "re-save only the weights: torch.save(model.state_dict(), path) or save_file(...) from safetensors",
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DsnnError(f"{path} is not a readable torch checkpoint ({_short(exc)})", "check the file") from exc
    tensors, skipped = _flatten_state(obj, path)
    return tensors, skipped, lambda: sha256_of(buffer)


def _flatten_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict):
        raise DsnnError(
            f"{path} holds a {type(obj).__name__}, not a state dict", "save model.state_dict() instead"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    return tensors, skipped


def read_hf_dir(path: Path, verify: bool = True
                ) -> tuple[dict[str, torch.Tensor], Path, dict[str, str], Callable[[], str]]:
    """Weights of a ``save_pretrained`` directory, the file that identifies it (the weights file or the shard
    index), the small text files, and a function giving that file's sha256 from the bytes that were read.
    ``verify`` checks the checksums a weights file written by dsnn carries."""
    hf_files: dict[str, str] = {}
    for item in sorted(path.iterdir()):
        if item.is_file() and item.suffix in HF_KEPT_SUFFIXES and item.stat().st_size <= HF_KEPT_MAX_BYTES:
            if item.name.endswith(".index.json"):
                continue
            try:
                hf_files[item.name] = item.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    for weights in HF_WEIGHT_FILES:
        candidate = path / weights
        if not candidate.is_file():
            continue
        if weights.endswith(".index.json"):
            raw = candidate.read_bytes()
            try:
                index = json.loads(raw.decode("utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise DsnnError(f"{candidate} is not a valid shard index", "re-save the model") from None
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = path / shard
                if not shard_path.is_file():
                    raise DsnnError(f"shard {shard_path} listed in {candidate.name} is missing", "copy all shards")
                tensors.update(read_weights_file(shard_path, verify)[0])
            return tensors, candidate, hf_files, functools.partial(sha256_of, raw)
        tensors, _, _, digest = read_weights_file(candidate, verify)
        return tensors, candidate, hf_files, digest
    raise DsnnError(
        f"{path} has config.json but no model.safetensors or pytorch_model.bin",
        "point at a complete save_pretrained directory",
    )


def read_weights_file(path: Path, verify: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], Callable[[], str]]:
    """Tensors, safetensors metadata, ignored non-tensor entries and a sha256 function of one weights file (read
    once; ``verify`` checks the checksums a safetensors file written by dsnn carries)."""
    if path.suffix == ".safetensors":
        file = open_safetensors(path)
        try:
            tensors = file.load(verify)
        except BaseException:
            file.close()
            raise
        return decompress_state_dict(tensors, file.metadata), dict(file.metadata), [], file.sha256
    if path.suffix in TORCH_SUFFIXES:
        tensors, skipped, digest = read_torch_file(path)
        return tensors, {}, skipped, digest
    raise DsnnError(
        f"{path} has an unsupported extension {path.suffix!r}",
        "use .safetensors, .pt, .pth, .bin, .ckpt or a Hugging Face model directory",
    )
