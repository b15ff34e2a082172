"""Depth levels of Whisper models: encoder and decoder layers dropped at sparse levels (``docs/depth.md``).

Stacks: ``model.encoder.layers`` and ``model.decoder.layers``. A dropped layer runs as the identity (its parameters
are all pruned, see :mod:`~dsnn_compress.core.depth`); on views (:func:`set_depth`) it is left out of the layer list,
and a level's smaller model (:func:`depth_metadata`) simply has fewer layers: ``encoder_layers`` /
``decoder_layers`` in config.json, which transformers and CTranslate2 (faster-whisper) read unchanged.

transformers' decoder caches keys and values per ``layer_idx``: running a subset of the layers on views renumbers the
kept layers' attention modules 0..n-1 (and ``config.decoder_layers``), and the dense level restores them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

SIDES = ("encoder", "decoder")
STACKS = {side: f"model.{side}.layers" for side in SIDES}
CONFIG_KEYS = {"encoder": "encoder_layers", "decoder": "decoder_layers"}


def stack_sizes(model: nn.Module) -> dict[str, int]:
    """Layers per stack (``model.encoder.layers``, ``model.decoder.layers``)."""
    return {STACKS[side]: len(getattr(model.model, side).layers) for side in SIDES}


class DepthViews:
    """Runs a subset of each stack's layers on the same modules (no copy); remembers the full stacks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.full = {side: getattr(model.model, side).layers for side in SIDES}
        self.config = {side: int(getattr(model.config, CONFIG_KEYS[side])) for side in SIDES}

    def apply(self, dropped: Mapping[str, Sequence[int]] | None) -> None:
        """Leave out the layers ``dropped[stack]`` (None or empty: every layer runs)."""
        for side in SIDES:
            layers = self.full[side]
            gone = set((dropped or {}).get(STACKS[side], ()))
            kept = [layer for i, layer in enumerate(layers) if i not in gone]
            getattr(self.model.model, side).layers = layers if not gone else nn.ModuleList(kept)
            setattr(self.model.config, CONFIG_KEYS[side], len(kept))
            if side == "decoder":
                for index, layer in enumerate(kept):
                    layer.self_attn.layer_idx = index
                    layer.encoder_attn.layer_idx = index
        if not dropped:
            for side in SIDES:
                setattr(self.model.config, CONFIG_KEYS[side], self.config[side])


def depth_metadata(meta: Mapping[str, Any], kept_layers: Mapping[str, int]) -> dict[str, Any]:
    """``meta`` describing the model with ``kept_layers[stack]`` layers per stack (config.json's layer counts)."""
    config = json.loads(meta["hf_files"]["config.json"])
    for side in SIDES:
        if STACKS[side] in kept_layers:
            config[CONFIG_KEYS[side]] = int(kept_layers[STACKS[side]])
    files = {**meta["hf_files"], "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    return {**meta, "hf_files": files}
