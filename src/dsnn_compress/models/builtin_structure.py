"""Structured groups of the built-in families: which coupled slices make a neuron, head or channel, the smaller
configs that hold a structured level, and running a level on views (see ``docs/structured.md``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from ..core.groups import GroupSpec, Member
from .conformer import ConformerConfig, ConformerCTC
from .lstm import LSTMCTC, LSTMConfig


def _linear_rows(prefix: str, width: int = 1, offset: int = 0) -> tuple[Member, ...]:
    return (Member(f"{prefix}.weight", 0, offset, width), Member(f"{prefix}.bias", 0, offset, width, scored=False))


def conformer_groups(model: ConformerCTC) -> list[GroupSpec]:
    """Subsampling channels, then per layer: ``ff1``/``ff2`` neurons, ``attn`` heads, ``conv`` channels."""
    sub = model.subsampling
    c1, c2 = sub.conv1.out_channels, sub.conv2.out_channels
    specs = [
        GroupSpec("subsampling.conv1", "subsampling-channel", -1, c1,
                  (*_linear_rows("subsampling.conv1"), Member("subsampling.conv2.weight", 1))),
        GroupSpec("subsampling.conv2", "subsampling-channel", -1, c2,
                  (*_linear_rows("subsampling.conv2"), Member("subsampling.out.weight", 1, 0, sub.freq))),
    ]
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        for ff in ("ff1", "ff2"):
            hidden = getattr(block, ff).linear1.out_features
            specs.append(GroupSpec(f"{p}.{ff}", "ffn-neuron", i, hidden,
                                   (*_linear_rows(f"{p}.{ff}.linear1"), Member(f"{p}.{ff}.linear2.weight", 1))))
        attn = block.attn
        hd = attn.head_dim
        specs.append(GroupSpec(f"{p}.attn", "attention-head", i, attn.num_heads, (
            *_linear_rows(f"{p}.attn.q_proj", hd), *_linear_rows(f"{p}.attn.k_proj", hd),
            *_linear_rows(f"{p}.attn.v_proj", hd), Member(f"{p}.attn.out_proj.weight", 1, 0, hd))))
        c = block.conv.depthwise.out_channels
        specs.append(GroupSpec(f"{p}.conv", "conv-channel", i, c, (
            *_linear_rows(f"{p}.conv.pointwise1"), *_linear_rows(f"{p}.conv.pointwise1", 1, c),
            *_linear_rows(f"{p}.conv.depthwise"),
            Member(f"{p}.conv.depthwise_norm.weight", 0, scored=False),
            Member(f"{p}.conv.depthwise_norm.bias", 0, scored=False),
            Member(f"{p}.conv.pointwise2.weight", 1))))
    return specs


def conformer_compact_config(cfg: ConformerConfig, kept: Mapping[str, int]) -> ConformerConfig:
    """``cfg`` with the per-layer sizes ``kept`` (set name -> groups kept; sets not named keep their size)."""
    layers = [cfg.layer_sizes(i) for i in range(cfg.num_layers)]
    for i, sizes in enumerate(layers):
        for key in sizes:
            sizes[key] = int(kept.get(f"layers.{i}.{key}", sizes[key]))
    sub = list(cfg.subsampling_channels or (cfg.d_model, cfg.d_model))
    sub = [int(kept.get(f"subsampling.conv{j + 1}", sub[j])) for j in range(2)]
    return dataclasses.replace(
        cfg, ff1_dims=[s["ff1"] for s in layers], ff2_dims=[s["ff2"] for s in layers],
        attn_heads=[s["attn"] for s in layers], conv_channels=[s["conv"] for s in layers], subsampling_channels=sub)


def conformer_set_widths(model: ConformerCTC, kept: Mapping[str, int] | None) -> None:
    """Run only the first ``kept[name]`` groups of every set on views of the weights (None: everything)."""
    if kept is None:
        model.subsampling.active = None
        for block in model.layers:
            for part in ("ff1", "ff2", "attn", "conv"):
                getattr(block, part).active = None
        return
    model.subsampling.active = {"conv1": int(kept["subsampling.conv1"]), "conv2": int(kept["subsampling.conv2"])}
    for i, block in enumerate(model.layers):
        for part in ("ff1", "ff2", "attn", "conv"):
            getattr(block, part).active = int(kept[f"layers.{i}.{part}"])


def lstm_groups(model: LSTMCTC) -> list[GroupSpec]:
    """Per layer: hidden unit ``j`` of both directions (gate rows of ``weight_ih/hh`` and both biases, ``weight_hh``
    columns, and the next layer's input columns or the CTC head's columns)."""
    lstm: nn.LSTM = model.lstm
    h = lstm.hidden_size
    suffixes = ["", "_reverse"] if lstm.bidirectional else [""]
    specs = []
    for layer in range(lstm.num_layers):
        members: list[Member] = []
        for direction, suffix in enumerate(suffixes):
            for gate in range(4):
                members.append(Member(f"lstm.weight_ih_l{layer}{suffix}", 0, gate * h))
                members.append(Member(f"lstm.weight_hh_l{layer}{suffix}", 0, gate * h))
                for bias in ("bias_ih", "bias_hh"):
                    members.append(Member(f"lstm.{bias}_l{layer}{suffix}", 0, gate * h, scored=False))
            members.append(Member(f"lstm.weight_hh_l{layer}{suffix}", 1))
            if layer + 1 < lstm.num_layers:
                for next_suffix in suffixes:
                    members.append(Member(f"lstm.weight_ih_l{layer + 1}{next_suffix}", 1, direction * h))
            else:
                members.append(Member("ctc.weight", 1, direction * h))
        specs.append(GroupSpec(f"lstm.l{layer}", "lstm-unit", layer, h, tuple(members)))
    return specs


def lstm_compact_refusal(kept: Mapping[str, int]) -> str | None:
    """Why these unit counts cannot be one ``nn.LSTM`` (one hidden size for every layer), or None."""
    if len(set(kept.values())) > 1:
        sizes = ", ".join(f"{k}={v}" for k, v in sorted(kept.items()))
        return (f"nn.LSTM has one hidden size for all layers, but this level keeps different unit counts ({sizes}); "
                "prune with --allocation per-layer to export LSTM levels physically smaller")
    return None


def lstm_compact_config(cfg: LSTMConfig, kept: Mapping[str, int]) -> LSTMConfig:
    """``cfg`` with the (uniform) hidden size of ``kept``."""
    refusal = lstm_compact_refusal(kept)
    if refusal:
        raise ValueError(refusal)
    return dataclasses.replace(cfg, hidden=int(next(iter(kept.values()), cfg.hidden)))
