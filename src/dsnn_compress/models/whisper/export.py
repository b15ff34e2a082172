"""Writing a Whisper adapter (at whatever level its weights are) as a Hugging Face or a faster-whisper directory.

Both directories appear atomically (:func:`~dsnn_compress.atomic.atomic_directory`). The Hugging Face directory is
complete: weights (``model.safetensors``, the source's tensor names, the token embedding tied to ``proj_out``), the
source's ``config.json`` (full 30 s context, whatever ``audio_ctx`` the bundle ran with), a generation config that
works with and without ``language=``, the feature-extractor config, and the tokenizer as ``tokenizer.json`` plus
``vocab.json`` / ``merges.txt`` so slow tokenizers and other tools load it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ...atomic import atomic_directory
from ...core.safetensors_io import write_safetensors
from ..base import weights_in
from .adapter import WhisperAdapter
from .metadata import FAMILY, TOKENIZER_FILES


def _write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def bpe_files(tokenizer_json: str) -> dict[str, str]:
    """``vocab.json`` and ``merges.txt`` of a byte-level BPE ``tokenizer.json`` (empty when it is not one)."""
    data = json.loads(tokenizer_json)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"vocab.json": json.dumps(model.get("vocab", {}), ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges)}


def _export_record(level: float | None) -> dict[str, Any]:
    return {"level": level, "family": FAMILY}


def save_hf_directory(adapter: WhisperAdapter, output: str | os.PathLike, level: float | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as a complete ``save_pretrained`` directory that ``from_pretrained`` loads."""
    out = Path(output)
    files = adapter.hf_files
    with atomic_directory(out) as tmp:
        state = weights_in(adapter.model.state_dict(), dtype)
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt"})
        _write(tmp, "config.json", files["config.json"])
        _write(tmp, "generation_config.json", files.get("generation_config.json")
               or adapter.generation_config.to_json_string())
        _write(tmp, "preprocessor_config.json", files["preprocessor_config.json"])
        for name in TOKENIZER_FILES:
            if name in files:
                _write(tmp, name, files[name])
        if "tokenizer.json" in files and not (tmp / "vocab.json").exists():
            for name, text in bpe_files(files["tokenizer.json"]).items():
                _write(tmp, name, text)
        if not (tmp / "tokenizer_config.json").exists():
            adapter.tokenizer.save_pretrained(str(tmp), legacy_format=False, filename_prefix=None)
        if level is not None:
            _write(tmp, "dsnn_export.json", json.dumps(_export_record(level), indent=2))
    return out


def save_ct2_directory(adapter: WhisperAdapter, output: str | os.PathLike, level: float | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as a faster-whisper (CTranslate2) model directory, with the model's
    ``preprocessor_config.json`` beside it (faster-whisper reads its mel bins from there: without it, 80)."""
    from .ct2 import write_ct2_directory

    out = Path(output)
    with atomic_directory(out) as tmp:
        state = weights_in(adapter.model.state_dict(), dtype)
        write_ct2_directory(tmp, state, adapter.hf_files)
        if "preprocessor_config.json" in adapter.hf_files:
            _write(tmp, "preprocessor_config.json", adapter.hf_files["preprocessor_config.json"])
        if level is not None:
            _write(tmp, "dsnn_export.json", json.dumps(_export_record(level), indent=2))
    return out
