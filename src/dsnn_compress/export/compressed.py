"""`dsnn export --compress`: a level with its pruned weights in compressed-tensors' ``sparse-bitmask`` layout.

The tensor layout is :mod:`dsnn_compress.core.compressed`. A file (``--format safetensors`` / ``checkpoint``)
carries the list of compressed tensors in its metadata; a Hugging Face directory (``--format hf``) additionally gets
the ``quantization_config.sparsity_config`` entry in ``config.json`` that compressed-tensors' ``ModelCompressor``
wrote for sparse models (``docs/compressed.md`` says which loaders read it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory
from ..core.compressed import compress_state_dict, compression_record
from ..core.safetensors_io import read_safetensors, write_safetensors
from ..errors import UsageError

COMPRESS_FORMATS = ("safetensors", "checkpoint", "hf")
"""Export formats ``--compress`` applies to."""


def check_compress_format(fmt: str) -> None:
    """UsageError unless ``--compress`` can be written in ``fmt``."""
    if fmt not in COMPRESS_FORMATS:
        raise UsageError(f"--compress does not apply to --format {fmt}",
                         "use --format " + ", ".join(COMPRESS_FORMATS) + ", or drop --compress")


def sparsity_config(compressed: Iterable[str], global_sparsity: float) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for a sparse-bitmask checkpoint (compressed-tensors'
    ``BitmaskConfig`` fields; targets are the compressed modules by name)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": {
            "format": "sparse-bitmask",
            "global_sparsity": round(global_sparsity, 6),
            "sparsity_structure": "unstructured",
            "targets": sorted(name[: -len(".weight")] for name in compressed),
            "ignore": [],
        },
    }


def compress_weight_files(directory: Path, candidates: Iterable[str], global_sparsity: float) -> list[str]:
    """Rewrite the safetensors weight file(s) of a ``save_pretrained`` directory in the sparse-bitmask layout and
    record it in ``config.json`` (and the shard index). Returns the names of the compressed tensors."""
    wanted = set(candidates)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    compressed: list[str] = []
    for name in files:
        tensors, metadata = read_safetensors(directory / name)
        stored, extra = compress_state_dict(tensors, wanted)
        write_safetensors(directory / name, stored, {**metadata, **extra})
        done = compression_record(extra)["tensors"]  # type: ignore[index]
        compressed += done
        if index is not None:
            for tensor in done:
                del index["weight_map"][tensor]
                prefix = tensor[: -len(".weight")]
                for part in ("shape", "compressed", "bitmask", "row_offsets"):
                    index["weight_map"][f"{prefix}.{part}"] = name
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = sparsity_config(compressed, global_sparsity)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(compressed)


def write_compressed_directory(save: Callable[..., Path], adapter: Any, output: Path, level: float,
                               dtype: Any, candidates: Iterable[str], global_sparsity: float) -> Path:
    """``save(adapter, dir, level=, dtype=)`` (a family's ``save_hf``) into a temporary directory, then compress
    its weights there; the finished directory replaces ``output`` in one rename."""
    with atomic_directory(output) as tmp:
        inner = save(adapter, tmp / "model", level=level, dtype=dtype)
        compress_weight_files(inner, candidates, global_sparsity)
        for item in sorted(inner.iterdir()):
            item.rename(tmp / item.name)
        inner.rmdir()
    return output
