"""Exporting an ``hf-ctc`` adapter back to a Hugging Face ``save_pretrained`` directory.

:func:`save_hf_directory` writes the model (at whatever level its weights are) with ``save_pretrained`` under the
source's tensor names, the source's tokenizer and feature-extractor files verbatim, and an optional
``dsnn_export.json`` naming the level; the directory appears atomically (built beside the target, then renamed).
``transformers`` is imported only when a directory is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...atomic import atomic_directory
from ..base import weights_in
from .adapter import HFCTCAdapter
from .metadata import FAMILY, FEATURE_EXTRACTOR_FILES, TOKENIZER_FILES, import_transformers, write_files


def save_hf_directory(adapter: HFCTCAdapter, output: str | os.PathLike, level: float | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as a complete ``save_pretrained`` directory, atomically.

    The directory is built beside ``output`` and renamed into place; an existing ``output`` (file or directory) is
    replaced only after the new one is complete. Holds ``config.json`` and the weights from ``save_pretrained``
    (tensor names as in the source), the source's tokenizer and feature-extractor files verbatim, and a
    ``preprocessor_config.json`` written from the feature extractor when the source had only a processor file.
    """
    out = Path(output)
    hf_logging = import_transformers().utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    with atomic_directory(out) as tmp:
        state = weights_in(adapter.model.state_dict(), dtype)
        hf_logging.disable_progress_bar()  # our CLI shows its own progress
        try:
            adapter.model.save_pretrained(str(tmp), state_dict=state)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        write_files(tmp, adapter.hf_files, TOKENIZER_FILES + FEATURE_EXTRACTOR_FILES)
        if not (tmp / "preprocessor_config.json").exists():
            adapter.feature_extractor.save_pretrained(str(tmp))
        if level is not None:
            (tmp / "dsnn_export.json").write_text(
                json.dumps({"level": level, "family": FAMILY, "architecture": adapter.architecture}, indent=2) + "\n",
                encoding="utf-8")
    return out
