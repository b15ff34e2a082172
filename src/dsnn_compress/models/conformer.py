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

    @model_validator(mode="after")
    def _shape_rules(self) -> ConformerConfig:
        if self.d_model % self.num_heads:
            raise rule_error(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})",
                             keys=("d_model", "num_heads"))
        if self.conv_kernel % 2 == 0:
            raise rule_error(f"conv_kernel must be odd, got {self.conv_kernel}", keys=("conv_kernel",))
        return self


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
    """Two stride-2 ``Conv2d`` 3x3 layers with ReLU, then a Linear projection to ``d_model`` (time / 4)."""

    def __init__(self, input_dim: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, d_model, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        freq = (((input_dim + 1) // 2) + 1) // 2
        self.out = nn.Linear(d_model * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, F]`` -> ``[B, ceil(T/4), d_model]`` and the subsampled lengths."""
        x = x * _length_mask(lengths, x.shape[1])[:, :, None].to(x.dtype)
        x = F.relu(self.conv1(x.unsqueeze(1)))  # [B, C, T1, F1]
        lengths = _half_length(lengths)
        x = x * _length_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        x = F.relu(self.conv2(x))  # [B, C, T2, F2]
        lengths = _half_length(lengths)
        x = x * _length_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)
        return self.out(x), lengths


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
    """Conformer feed-forward module: LayerNorm, Linear, SiLU, dropout, Linear, dropout."""

    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_model * mult)
        self.linear2 = nn.Linear(d_model * mult, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, D]`` (residual branch only)."""
        x = self.dropout(F.silu(self.linear1(self.norm(x))))
        return self.dropout(self.linear2(x))


class MultiHeadSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with explicit q/k/v/out projections and a key-padding mask."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, D]``; ``key_mask`` ``[B, T]`` True on frames that may be attended to."""
        b, t, d = x.shape
        h = self.norm(x)
        q, k, v = self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.dropout(self.out_proj(out))


class ConvModule(nn.Module):
    """Conformer convolution module with LayerNorm instead of BatchNorm (safe for padded, tiny batches)."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size=kernel_size, padding=kernel_size // 2, groups=d_model)
        self.depthwise_norm = nn.LayerNorm(d_model)
        self.pointwise2 = nn.Conv1d(d_model, d_model, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, D]``; ``mask`` ``[B, T]`` True on valid frames (padded frames are zeroed)."""
        h = self.norm(x).transpose(1, 2)  # [B, D, T]
        h = F.glu(self.pointwise1(h), dim=1)
        h = h * mask[:, None, :].to(h.dtype)
        h = self.depthwise(h)
        h = F.silu(self.depthwise_norm(h.transpose(1, 2))).transpose(1, 2)
        h = self.pointwise2(h)
        return self.dropout(h.transpose(1, 2))


class ConformerBlock(nn.Module):
    """Macaron Conformer block: ``x + FF/2, + MHSA, + Conv, + FF/2, LayerNorm``."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.ff1 = FeedForward(cfg.d_model, cfg.ff_mult, cfg.dropout)
        self.attn = MultiHeadSelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.conv = ConvModule(cfg.d_model, cfg.conv_kernel, cfg.dropout)
        self.ff2 = FeedForward(cfg.d_model, cfg.ff_mult, cfg.dropout)
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
        self.subsampling = Conv2dSubsampling4(cfg.input_dim, cfg.d_model)
        self.pos_enc = SinusoidalPositionalEncoding(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([ConformerBlock(cfg) for _ in range(cfg.num_layers)])
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
