"""The "transformer-like" recurrent language model of the WikiText-103 protocol (DESIGN.md §5).

Each block: pre-LayerNorm → recurrent layer → linear, residual; then pre-LayerNorm → 4×
GELU MLP, residual.  GPT-2 style initialisation: normal(0, 0.02) weights, residual
output projections scaled by 1/√(2·layers).
"""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from .lm import CELLS


class RecurrentBlock(nn.Module):
    def __init__(self, width: int, cell: str) -> None:
        super().__init__()
        self.norm_rnn = nn.LayerNorm(width)
        self.rnn = CELLS[cell](width, width, batch_first=True)
        self.proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.proj(self.rnn(self.norm_rnn(x))[0])
        return x + self.mlp(self.norm_mlp(x))


class TransformerLikeRNN(nn.Module):
    """Embedding → ``num_layers`` recurrent blocks → LayerNorm → linear head."""

    def __init__(self, vocab_size: int, width: int = 512, num_layers: int = 3, cell: str = "gru") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell={cell!r}: expected one of {', '.join(CELLS)}")
        self.embedding = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(RecurrentBlock(width, cell) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self._init_weights(num_layers)

    def _init_weights(self, num_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * num_layers))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
