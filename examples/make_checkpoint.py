"""Write a small random dense checkpoint (Linear + LSTM layers) to try `dsnn prune` on.

Usage: python examples/make_checkpoint.py OUT.safetensors
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from dsnn_compress.core.safetensors_io import write_safetensors


class TinyASR(nn.Module):
    """A small acoustic-model-shaped network: input projection, a BiLSTM, a feed-forward block, a CTC head."""

    def __init__(self) -> None:
        super().__init__()
        self.input_proj = nn.Linear(80, 256)
        self.lstm = nn.LSTM(256, 256, num_layers=2, bidirectional=True, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(512), nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 512))
        self.ctc = nn.Linear(512, 30)


def main() -> None:
    """Build the model with a fixed seed and save its state dict."""
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_checkpoint.py OUT.safetensors")
    torch.manual_seed(0)
    write_safetensors(sys.argv[1], TinyASR().state_dict())
    print(f"wrote {sys.argv[1]}")


if __name__ == "__main__":
    main()
