"""Structured levels of Whisper models: the FFN neurons of every encoder and decoder layer (``docs/structured.md``).

Group sets: ``model.encoder.layers.<i>.ffn`` and ``model.decoder.layers.<i>.ffn`` (``fc1`` row + bias, ``fc2``
column; GELU(0) = 0, so a zeroed neuron contributes nothing). Attention heads are not declared: ``WhisperConfig`` has
one head count per side and derives ``head_dim = d_model / heads``, transformers 5 has no ``prune_heads``, and
CTranslate2 stores one ``num_heads`` per side too (``docs/whisper.md``).

A level whose FFN size is the same in every layer of a side (``--allocation per-layer``; encoder and decoder may
differ) is a config change (``encoder_ffn_dim`` / ``decoder_ffn_dim``) that the Hugging Face and faster-whisper
(CTranslate2) directories hold. Different sizes per layer (``global``) travel in the model description's ``ffn_dims``
(the dsnn checkpoint format); a faster-whisper directory holds them too (CTranslate2 takes each layer's FFN shapes
from ``model.bin``, and the ``ct2-dir`` reader gives them back as ``ffn_dims``), a Hugging Face directory cannot
(its config has one size per side), so only ``hf`` refuses them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ...core.groups import GroupSpec
from ...errors import DsnnError, UsageError
from ..hf_ctc.ffn import check_ffn_dims, ffn_spec, layer_widths, narrow_block, non_uniform_reason, resize_block, uniform

SIDES = ("encoder", "decoder")
FORMAT_NAMES = {"hf": "Hugging Face"}
"""The directory formats that hold one FFN size per side (CTranslate2's ``model.bin`` holds one per layer)."""


def _layers(model: nn.Module, side: str) -> Any:
    return getattr(model.model, side).layers


def set_names(model: nn.Module, side: str) -> list[str]:
    """The group-set name of each ``side`` layer's FFN."""
    return [f"model.{side}.layers.{i}.ffn" for i in range(len(_layers(model, side)))]


def ffn_groups(model: nn.Module) -> list[GroupSpec]:
    """One ``ffn-neuron`` set per encoder layer, then per decoder layer."""
    specs = []
    for side in SIDES:
        for i, (name, layer) in enumerate(zip(set_names(model, side), _layers(model, side), strict=True)):
            prefix = f"model.{side}.layers.{i}"
            specs.append(ffn_spec(name, i, f"{prefix}.fc1", f"{prefix}.fc2", layer.fc1.out_features))
    return specs


def side_widths(model: nn.Module, kept: Mapping[str, int]) -> dict[str, list[int]]:
    """Per side, the FFN size of every layer at the level that keeps ``kept`` (sets not named keep their size)."""
    return {side: layer_widths(set_names(model, side), [layer.fc1.out_features for layer in _layers(model, side)],
                               kept) for side in SIDES}


def refusal(kept: Mapping[str, int], fmt: str) -> str | None:
    """Why ``fmt`` (``hf``) cannot hold these sizes: one FFN size per side, or None (every other format)."""
    if fmt not in FORMAT_NAMES:
        return None
    for side in SIDES:
        widths = [n for name, n in kept.items() if name.startswith(f"model.{side}.")]
        if widths and uniform(widths) is None:
            return non_uniform_reason(FORMAT_NAMES[fmt], f"{side}_ffn_dim", widths)
    return None


def compact_metadata(meta: Mapping[str, Any], widths: Mapping[str, list[int]]) -> dict[str, Any]:
    """``meta`` describing the model with FFN sizes ``widths`` (per side): ``<side>_ffn_dim`` in config.json for a
    side whose layers agree, ``ffn_dims[side]`` for one whose layers differ."""
    out = {k: v for k, v in meta.items() if k != "ffn_dims"}
    config = json.loads(meta["hf_files"]["config.json"])
    dims = {}
    for side in SIDES:
        common = uniform(widths[side])
        if common is None:
            dims[side] = list(widths[side])
        else:
            config[f"{side}_ffn_dim"] = common
    out["hf_files"] = {**meta["hf_files"], "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    if dims:
        out["ffn_dims"] = dims
    return out


def check_dims(value: Any, model: nn.Module, hint: str) -> dict[str, list[int]]:
    """The ``ffn_dims`` of model metadata: ``{side: [size per layer]}`` for some sides (DsnnError if malformed)."""
    if not isinstance(value, dict) or not value or set(value) - set(SIDES):
        raise DsnnError(f"whisper model metadata ffn_dims must map encoder/decoder to per-layer sizes, got {value!r}",
                        hint)
    return {side: check_ffn_dims(dims, len(_layers(model, side)), f"whisper model metadata ffn_dims.{side}", hint)
            for side, dims in value.items()}


def apply_ffn_dims(model: nn.Module, dims: Mapping[str, list[int]]) -> None:
    """Give layer ``i`` of each side named in ``dims`` an FFN of ``dims[side][i]`` neurons (fresh weights)."""
    for side, widths in dims.items():
        for layer, width in zip(_layers(model, side), widths, strict=True):
            if layer.fc1.out_features != width:
                resize_block(layer, "fc1", "fc2", width)
    model.train(model.training)


def set_widths(model: nn.Module, kept: Mapping[str, int] | None) -> None:
    """Run each FFN's first ``kept[name]`` neurons on views of its weights (None: full width)."""
    for side in SIDES:
        for name, layer in zip(set_names(model, side), _layers(model, side), strict=True):
            narrow_block(layer.fc1, layer.fc2, None if kept is None else kept.get(name))


def refuse_directory_export(dims: Mapping[str, list[int]] | None, fmt: str) -> None:
    """UsageError when a model with per-layer FFN sizes is to be written as a ``fmt`` directory that holds one size
    per side (``hf``)."""
    if fmt not in FORMAT_NAMES:
        return
    for side, widths in (dims or {}).items():
        if uniform(widths) is None:
            raise UsageError(non_uniform_reason(FORMAT_NAMES[fmt], f"{side}_ffn_dim", widths),
                             "export it with --format checkpoint")
