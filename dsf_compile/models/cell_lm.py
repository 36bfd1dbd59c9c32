"""A language model whose recurrence is a hand-written GRU cell in a Python loop.

This is the "any RNN code" case: no nn.GRU, the step written out with Linear layers and
pointwise ops, the loop over time in ``forward``.  dsf_compile re-rolls it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class HandWrittenGRUCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input = nn.Linear(input_size, 3 * hidden_size)
        self.hidden = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        x_r, x_z, x_n = self.input(x).chunk(3, -1)
        h_r, h_z, h_n = self.hidden(h).chunk(3, -1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n)


class HandWrittenGRULM(nn.Module):
    """Embedding → layers of a hand-written GRU cell looped over time (residual between
    layers) → linear head.  Tokens ``(B, T)`` → logits ``(B, T, V)``."""

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.cells = nn.ModuleList(HandWrittenGRUCell(hidden_size, hidden_size) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        for i, cell in enumerate(self.cells):
            h = x.new_zeros(x.shape[0], self.hidden_size)
            outputs = []
            for t in range(x.shape[1]):
                h = cell(x[:, t], h)
                outputs.append(h)
            y = torch.stack(outputs, 1)
            x = y if i == 0 else x + y
        return self.head(x)
