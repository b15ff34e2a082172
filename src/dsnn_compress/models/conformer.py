"""Conformer encoder with a CTC head.

Shapes and lengths:

* input features ``[B, T, F]`` with ``lengths`` ``[B]``;
* ``conv2d4`` subsampling: two ``Conv2d(3x3, stride 2, padding 1)`` + ReLU, so each stage maps a length
  ``L`` to ``(L + 1) // 2`` (= ``ceil(L / 2)``) and the output has ``T' = ceil(ceil(T / 2) / 2)`` frames
  (= ``ceil(T / 4)``); frames past an utterance's length are zeroed after each stage, so an utterance
  gives the same output alone or padded in a batch;
* sinusoidal absolute positional encoding added after subsampling;
* ``num_layers`` Conformer blocks (half FF, MHSA, conv module, half FF, LayerNorm);
* CTC head ``ctc`` producing log-probabilities ``[B, T', V]``.

``forward`` has no Python control flow that depends on tensor values, so it traces/exports to ONNX with
dynamic batch and time axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, TypeAdapter, model_validator
from pydantic.dataclasses import dataclass
from torch import nn

from ..validation import Float, Int, OneOf, rule_error

SUBSAMPLING_MODES = ("conv2d4",)
Sizes = list[Annotated[Int, Field(ge=1)]]


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class ConformerConfig:
    """Architecture of a :class:`ConformerCTC` (defaults are the ``s`` preset).

    A pydantic dataclass built from the field types of :mod:`dsnn_compress.validation`, as recipes are (numbers
    accept ``"2e4"``, a boolean is never a number): the constraints below are the only rules, checked on
    construction (an invalid config raises ``pydantic.ValidationError``, a ``ValueError``); ``models.builtin``
    reports them with the one formatter of :mod:`dsnn_compress.validation.errors`.
    """

    vocab_size: Annotated[Int, Field(ge=2, description="blank plus at least one token")]
    input_dim: Annotated[Int, Field(ge=1)] = 80
    d_model: Annotated[Int, Field(ge=1)] = 144
    num_layers: Annotated[Int, Field(ge=1)] = 8
    num_heads: Annotated[Int, Field(ge=1)] = 4
    ff_mult: Annotated[Int, Field(ge=1)] = 4
    conv_kernel: Annotated[Int, Field(ge=1)] = 15
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    subsampling: Annotated[str, OneOf(lambda: SUBSAMPLING_MODES)] = "conv2d4"
    ff1_dims: Sizes | None = None
    """Per-layer hidden width of the first FFN (a structured level's smaller model); None: ``ff_mult * d_model``."""
    ff2_dims: Sizes | None = None
    """Per-layer hidden width of the second FFN; None: ``ff_mult * d_model``."""
    attn_heads: Sizes | None = None
    """Per-layer attention heads kept (each of ``d_model // num_heads`` dims); None: ``num_heads``."""
    conv_channels: Sizes | None = None
    """Per-layer channels of the convolution module; None: ``d_model``."""
    subsampling_channels: Sizes | None = None
    """Output channels of the two subsampling convolutions; None: ``d_model`` each."""

    @model_validator(mode="after")
    def _shape_rules(self) -> ConformerConfig:
        if self.d_model % self.num_heads:
            raise rule_error(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})",
                             keys=("d_model", "num_heads"))
        if self.conv_kernel % 2 == 0:
            raise rule_error(f"conv_kernel must be odd, got {self.conv_kernel}", keys=("conv_kernel",))
        for key in ("ff1_dims", "ff2_dims", "attn_heads", "conv_channels", "subsampling_channels"):
            value = getattr(self, key)
            wanted = 2 if key == "subsampling_channels" else self.num_layers
            if value is not None and len(value) != wanted:
                raise rule_error(f"{key} must list {wanted} sizes, got {len(value)}", keys=(key,))
        if self.attn_heads is not None and max(self.attn_heads) > self.num_heads:
            raise rule_error(f"attn_heads may not exceed num_heads ({self.num_heads})", keys=("attn_heads",))
        return self

    def layer_sizes(self, layer: int) -> dict[str, int]:
        """The hidden sizes of block ``layer``: ``ff1``, ``ff2`` (neurons), ``attn`` (heads), ``conv`` (channels)."""
        full = {"ff1": self.ff_mult * self.d_model, "ff2": self.ff_mult * self.d_model, "attn": self.num_heads,
                "conv": self.d_model}
        given = {"ff1": self.ff1_dims, "ff2": self.ff2_dims, "attn": self.attn_heads, "conv": self.conv_channels}
        return {k: full[k] if given[k] is None else int(given[k][layer]) for k in full}


CONFORMER_SIZES: dict[str, dict[str, Any]] = {
    "xs": {"d_model": 96, "num_layers": 4, "num_heads": 4, "ff_mult": 4, "conv_kernel": 15, "dropout": 0.1},
    "s": {"d_model": 144, "num_layers": 8, "num_heads": 4, "ff_mult": 4, "conv_kernel": 15, "dropout": 0.1},
    "m": {"d_model": 256, "num_layers": 16, "num_heads": 4, "ff_mult": 4, "conv_kernel": 31, "dropout": 0.1},
}
"""Size presets: field values applied over :class:`ConformerConfig` defaults."""


def _half_length(lengths: torch.Tensor) -> torch.Tensor:
    """Output length of a ``kernel 3, stride 2, padding 1`` convolution: ``ceil(L / 2)``."""
    return torch.div(lengths + 1, 2, rounding_mode="floor")


def _length_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, frames]`` boolean mask, True on valid frames."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class Conv2dSubsampling4(nn.Module):
    """Two stride-2 ``Conv2d`` 3x3 layers with ReLU, then a Linear projection to ``d_model`` (time / 4).

    ``channels`` are the two convolutions' output channels (``d_model`` each by default; a structured level's
    smaller model has fewer). ``active`` (``{"conv1": n1, "conv2": n2}``, or None) runs only the first channels of
    each on views of the weights: a structured level without a copy.
    """

    def __init__(self, input_dim: int, d_model: int, channels: tuple[int, int] | None = None) -> None:
        super().__init__()
        c1, c2 = channels or (d_model, d_model)
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1)
        self.freq = (((input_dim + 1) // 2) + 1) // 2
        self.out = nn.Linear(c2 * self.freq, d_model)
        self.active: dict[str, int] | None = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, F]`` -> ``[B, ceil(T/4), d_model]`` and the subsampled lengths."""
        n1 = self.conv1.out_channels if self.active is None else self.active["conv1"]
        n2 = self.conv2.out_channels if self.active is None else self.active["conv2"]
        x = x * _length_mask(lengths, x.shape[1])[:, :, None].to(x.dtype)
        x = F.relu(F.conv2d(x.unsqueeze(1), self.conv1.weight[:n1], self.conv1.bias[:n1], 2, 1))  # [B, C, T1, F1]
        lengths = _half_length(lengths)
        x = x * _length_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        x = F.relu(F.conv2d(x, self.conv2.weight[:n2, :n1], self.conv2.bias[:n2], 2, 1))  # [B, C, T2, F2]
        lengths = _half_length(lengths)
        x = x * _length_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)
        return F.linear(x, self.out.weight[:, : n2 * self.freq], self.out.bias), lengths


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the standard sin/cos absolute positional encoding, computed on the fly for any length."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        half = (d_model + 1) // 2
        inv_freq = torch.exp(torch.arange(half, dtype=torch.float32) * (-2.0 * math.log(10000.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + PE`` for ``x`` of shape ``[B, T, d_model]``."""
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq[None, :]
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, : self.d_model]
        return x + pe.to(x.dtype)[None]


class FeedForward(nn.Module):
    """Conformer feed-forward module: LayerNorm, Linear, SiLU, dropout, Linear, dropout.

    ``hidden`` neurons; ``active`` (or None) runs only the first ``active`` of them on views of the weights.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, hidden)
        self.linear2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, D]`` (residual branch only)."""
        if self.active is None:
            x = self.dropout(F.silu(self.linear1(self.norm(x))))
            return self.dropout(self.linear2(x))
        n = self.active
        x = self.dropout(F.silu(F.linear(self.norm(x), self.linear1.weight[:n], self.linear1.bias[:n])))
        return self.dropout(F.linear(x, self.linear2.weight[:, :n], self.linear2.bias))


class MultiHeadSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with explicit q/k/v/out projections and a key-padding mask."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads if heads is None else heads
        self.head_dim = d_model // num_heads
        inner = self.num_heads * self.head_dim
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)
        self.active: int | None = None
        """Heads run (the first ones, on views of the weights), or None for all."""

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)

    def _project(self, proj: nn.Linear, h: torch.Tensor, width: int) -> torch.Tensor:
        return self._heads(F.linear(h, proj.weight[:width], proj.bias[:width]))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, D]``; ``key_mask`` ``[B, T]`` True on frames that may be attended to."""
        b, t, _ = x.shape
        h = self.norm(x)
        width = (self.num_heads if self.active is None else self.active) * self.head_dim
        q, k, v = (self._project(p, h, width) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, t, width)
        return self.dropout(F.linear(out, self.out_proj.weight[:, :width], self.out_proj.bias))


def zero_padded_layer_norm(x: torch.Tensor, width: int, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """LayerNorm over the last axis as if it had ``width`` entries, the missing ones exactly 0: the dense norm of a
    layer whose removed channels are zero (mean ``sum / width``, variance over the kept entries plus the zeros')."""
    n = x.shape[-1]
    if n == width:
        return F.layer_norm(x, (n,), weight, bias, eps)
    mean = x.sum(-1, keepdim=True) / width
    centred = x - mean
    var = (centred.pow(2).sum(-1, keepdim=True) + (width - n) * mean.pow(2)) / width
    return centred * torch.rsqrt(var + eps) * weight + bias


class ConvModule(nn.Module):
    """Conformer convolution module with LayerNorm instead of BatchNorm (safe for padded, tiny batches).

    ``channels`` (default ``d_model``) is the GLU/depthwise width; the depthwise LayerNorm always normalises as if
    ``d_model`` channels were there (:func:`zero_padded_layer_norm`), so a model with channels removed computes
    exactly what the dense one does with those channels zeroed. ``active`` (or None) runs only the first channels on
    views of the weights.
    """

    def __init__(self, d_model: int, kernel_size: int, dropout: float, channels: int | None = None) -> None:
        super().__init__()
        c = d_model if channels is None else channels
        self.full_width = d_model
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Conv1d(d_model, 2 * c, kernel_size=1)
        self.depthwise = nn.Conv1d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.depthwise_norm = nn.LayerNorm(c)
        self.pointwise2 = nn.Conv1d(c, d_model, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.active: int | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, D]``; ``mask`` ``[B, T]`` True on valid frames (padded frames are zeroed)."""
        h = self.norm(x).transpose(1, 2)  # [B, D, T]
        c = self.depthwise.out_channels
        n = c if self.active is None else self.active
        if n == c:
            h = F.glu(self.pointwise1(h), dim=1)
        else:
            w, b = self.pointwise1.weight, self.pointwise1.bias
            h = F.conv1d(h, w[:n], b[:n]) * torch.sigmoid(F.conv1d(h, w[c : c + n], b[c : c + n]))
        h = h * mask[:, None, :].to(h.dtype)
        h = F.conv1d(h, self.depthwise.weight[:n], self.depthwise.bias[:n], padding=self.depthwise.padding, groups=n)
        norm = self.depthwise_norm
        h = F.silu(zero_padded_layer_norm(h.transpose(1, 2), self.full_width, norm.weight[:n], norm.bias[:n],
                                          norm.eps)).transpose(1, 2)
        h = F.conv1d(h, self.pointwise2.weight[:, :n], self.pointwise2.bias)
        return self.dropout(h.transpose(1, 2))


class ConformerBlock(nn.Module):
    """Macaron Conformer block: ``x + FF/2, + MHSA, + Conv, + FF/2, LayerNorm``."""

    def __init__(self, cfg: ConformerConfig, layer: int = 0) -> None:
        super().__init__()
        sizes = cfg.layer_sizes(layer)
        self.ff1 = FeedForward(cfg.d_model, sizes["ff1"], cfg.dropout)
        self.attn = MultiHeadSelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout, sizes["attn"])
        self.conv = ConvModule(cfg.d_model, cfg.conv_kernel, cfg.dropout, sizes["conv"])
        self.ff2 = FeedForward(cfg.d_model, sizes["ff2"], cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """One block over ``[B, T, D]``."""
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, key_mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class ConformerCTC(nn.Module):
    """Conformer encoder + linear CTC head (``self.ctc``); outputs log-probabilities."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        TypeAdapter(ConformerConfig).validate_python(dataclasses.asdict(cfg))  # again: fields may have been changed
        self.config = cfg
        channels = tuple(cfg.subsampling_channels) if cfg.subsampling_channels else None
        self.subsampling = Conv2dSubsampling4(cfg.input_dim, cfg.d_model, channels)
        self.pos_enc = SinusoidalPositionalEncoding(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([ConformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.ctc = nn.Linear(cfg.d_model, cfg.vocab_size)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Frames after ``conv2d4`` subsampling: ``ceil(ceil(L / 2) / 2)``."""
        return _half_length(_half_length(lengths))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``[B, T, F]``, ``lengths`` ``[B]`` -> (log-probs ``[B, T', V]``, lengths ``[B]``)."""
        lengths = lengths.to(device=features.device, dtype=torch.long)
        x, out_lengths = self.subsampling(features, lengths)
        x = self.dropout(self.pos_enc(x))
        mask = _length_mask(out_lengths, x.shape[1])
        # A zero-length utterance would mask every key (NaN softmax); let it attend to frame 0 instead.
        key_mask = _length_mask(out_lengths.clamp(min=1), x.shape[1])
        for layer in self.layers:
            x = layer(x, mask, key_mask)
        return F.log_softmax(self.ctc(x), dim=-1), out_lengths
