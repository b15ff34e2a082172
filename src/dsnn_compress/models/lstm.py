"""(Bi)LSTM encoder with a CTC head.

Subsampling is by frame stacking: ``stackN`` concatenates ``N`` consecutive feature frames into one
(``[B, T, F]`` -> ``[B, ceil(T / N), N * F]``; the tail is zero-padded), so an utterance of ``L`` frames
gives ``ceil(L / N) = (L + N - 1) // N`` output frames. The default is ``stack2``. Frames past each
utterance's length are zeroed before stacking and the LSTM runs on packed sequences, so an utterance gives
the same output alone or padded in a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, StrictBool, TypeAdapter
from pydantic.dataclasses import dataclass
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..validation import Float, Int, OneOf

SUBSAMPLING_FACTORS = {"none": 1, "stack2": 2, "stack3": 3, "stack4": 4}


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class LSTMConfig:
    """Architecture of an :class:`LSTMCTC` (defaults are the ``s`` preset).

    A pydantic dataclass built from the field types of :mod:`dsnn_compress.validation`, as recipes are (numbers
    accept ``"2e4"``, a boolean is never a number, ``bidirectional`` is a strict boolean): the constraints below
    are the only rules, checked on construction (an invalid config raises ``pydantic.ValidationError``, a
    ``ValueError``).
    """

    vocab_size: Annotated[Int, Field(ge=2, description="blank plus at least one token")]
    input_dim: Annotated[Int, Field(ge=1)] = 80
    hidden: Annotated[Int, Field(ge=1)] = 256
    num_layers: Annotated[Int, Field(ge=1)] = 3
    bidirectional: StrictBool = True
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    subsampling: Annotated[str, OneOf(lambda: tuple(SUBSAMPLING_FACTORS))] = "stack2"


LSTM_SIZES: dict[str, dict[str, Any]] = {
    "xs": {"hidden": 128, "num_layers": 3, "bidirectional": True, "dropout": 0.1},
    "s": {"hidden": 256, "num_layers": 3, "bidirectional": True, "dropout": 0.1},
}
"""Size presets: field values applied over :class:`LSTMConfig` defaults."""


class LSTMCTC(nn.Module):
    """Frame-stacking subsampling, a multi-layer (Bi)LSTM and a linear CTC head (``self.ctc``)."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        TypeAdapter(LSTMConfig).validate_python(dataclasses.asdict(cfg))  # again: fields may have been changed
        self.config = cfg
        self.stack = SUBSAMPLING_FACTORS[cfg.subsampling]
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            input_size=cfg.input_dim * self.stack,
            hidden_size=cfg.hidden,
            num_layers=cfg.num_layers,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.output_dropout = nn.Dropout(cfg.dropout)
        self.ctc = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), cfg.vocab_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames after stacking: ``ceil(L / N)``."""
        return torch.div(lengths + (self.stack - 1), self.stack, rounding_mode="floor")

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``[B, T, F]``, ``lengths`` ``[B]`` -> (log-probs ``[B, T', V]``, lengths ``[B]``)."""
        lengths = lengths.to(device=features.device, dtype=torch.long)
        b, t, f = features.shape
        valid = torch.arange(t, device=features.device)[None, :] < lengths[:, None]
        x = features * valid[:, :, None].to(features.dtype)
        out_lengths = self.output_lengths(lengths)
        frames = (t + self.stack - 1) // self.stack
        x = F.pad(x, (0, 0, 0, self.stack - 1))[:, : frames * self.stack]
        x = x.reshape(b, frames, self.stack * f)
        x = self.input_dropout(x)
        packed = pack_padded_sequence(x, out_lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        x, _ = pad_packed_sequence(out, batch_first=True, total_length=frames)
        x = self.output_dropout(x)
        return F.log_softmax(self.ctc(x), dim=-1), out_lengths
