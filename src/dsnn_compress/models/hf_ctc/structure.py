"""Structured levels of ``hf-ctc`` models: the FFN neurons of every encoder layer (``docs/structured.md``).

Group sets: ``<prefix>encoder.layers.<i>.feed_forward`` (``intermediate_dense`` row + bias, ``output_dense``
column), one per transformer encoder layer. Attention heads are not declared: a Hugging Face config has one
``num_attention_heads`` for every layer and derives ``head_dim = hidden_size / num_attention_heads``, so a model with
fewer heads of the same size cannot be described, and transformers 5 has no ``prune_heads`` / ``pruned_heads`` to
load per-layer head pruning (``docs/huggingface.md``).

A level with the same FFN size in every layer (``--allocation per-layer``) is a plain config change
(``intermediate_size``): ``export --format hf`` writes a ``save_pretrained`` directory that ``from_pretrained`` loads
unchanged. Different sizes per layer (``global``) are carried by the model description's ``ffn_dims`` (the dsnn
checkpoint format) and refused for ``hf``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ...core.groups import GroupSpec
from ...errors import DsnnError, UsageError
from .ffn import ffn_spec, narrow_block, non_uniform_reason, resize_block, uniform

FIRST, SECOND = "intermediate_dense", "output_dense"


def encoder_layers(model: nn.Module) -> tuple[str, Any]:
    """(state-dict prefix of the base model, its ``encoder.layers``)."""
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layers", None)
    if layers is None:
        raise DsnnError(f"{type(model).__name__} has no encoder.layers", "this architecture is not supported")
    return ("" if base is model else f"{model.base_model_prefix}."), layers


def set_names(model: nn.Module) -> list[str]:
    """The group-set name of each encoder layer's FFN."""
    prefix, layers = encoder_layers(model)
    return [f"{prefix}encoder.layers.{i}.feed_forward" for i in range(len(layers))]


def ffn_groups(model: nn.Module) -> list[GroupSpec]:
    """One ``ffn-neuron`` set per encoder layer."""
    _, layers = encoder_layers(model)
    return [ffn_spec(name, i, f"{name}.{FIRST}", f"{name}.{SECOND}", getattr(layer.feed_forward, FIRST).out_features)
            for i, (name, layer) in enumerate(zip(set_names(model), layers, strict=True))]


def current_widths(model: nn.Module) -> list[int]:
    """The FFN size of every encoder layer."""
    return [int(getattr(layer.feed_forward, FIRST).out_features) for layer in encoder_layers(model)[1]]


def refusal(kept: Mapping[str, int], fmt: str) -> str | None:
    """Why ``fmt`` cannot hold these FFN sizes (``hf``: one ``intermediate_size`` for all layers), or None."""
    if fmt == "hf" and uniform(list(kept.values())) is None:
        return non_uniform_reason("Hugging Face", "intermediate_size", list(kept.values()))
    return None


def compact_metadata(meta: Mapping[str, Any], widths: list[int]) -> dict[str, Any]:
    """``meta`` describing a model with FFN sizes ``widths``: ``intermediate_size`` in config.json when they are all
    equal, else the per-layer ``ffn_dims`` (config.json unchanged)."""
    out = {k: v for k, v in meta.items() if k != "ffn_dims"}
    common = uniform(widths)
    if common is None:
        out["ffn_dims"] = list(widths)
        return out
    config = json.loads(meta["hf_files"]["config.json"])
    config["intermediate_size"] = common
    out["hf_files"] = {**meta["hf_files"], "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    return out


def apply_ffn_dims(model: nn.Module, dims: list[int]) -> None:
    """Give encoder layer ``i`` an FFN of ``dims[i]`` neurons (fresh weights, to be loaded)."""
    for layer, width in zip(encoder_layers(model)[1], dims, strict=True):
        if getattr(layer.feed_forward, FIRST).out_features != width:
            resize_block(layer.feed_forward, FIRST, SECOND, width)
    model.train(model.training)


def set_widths(model: nn.Module, kept: Mapping[str, int] | None) -> None:
    """Run the first ``kept[name]`` neurons of each FFN on views of its weights (None: full width)."""
    for name, layer in zip(set_names(model), encoder_layers(model)[1], strict=True):
        ff = layer.feed_forward
        narrow_block(getattr(ff, FIRST), getattr(ff, SECOND), None if kept is None else kept.get(name))


def refuse_hf_export(dims: list[int] | None) -> None:
    """UsageError when a model with per-layer FFN sizes ``dims`` is to be written as a Hugging Face directory."""
    if dims is not None and uniform(dims) is None:
        raise UsageError(non_uniform_reason("Hugging Face", "intermediate_size", dims),
                         "export it with --format checkpoint")
