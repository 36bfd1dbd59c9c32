"""Recurrence written by hand: a GRU cell of Linear layers and pointwise ops, stepped in a
Python loop.

This is the "any RNN code" case: no nn.GRU anywhere, the loop over time in ``forward``.
dsf_compile re-rolls it.  :class:`HandWrittenGRU` has nn.GRU's interface (one layer,
``batch_first``), so the reference language models can use it in place of nn.GRU
(``cell="gru-loop"``); :class:`HandWrittenGRULM` loops over layers and time in one
``forward``.
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


def run_over_time(cell: HandWrittenGRUCell, x: Tensor, h: Tensor) -> Tensor:
    """Every state ``(B, T, H)`` of ``cell`` stepped over ``x`` ``(B, T, D)`` from ``h``."""
    outputs = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        outputs.append(h)
    return torch.stack(outputs, 1)


class HandWrittenGRU(nn.Module):
    """One layer with nn.GRU's interface: ``(x, h0=None) -> (output, h_n)``, where
    ``h0`` and ``h_n`` are ``(1, B, H)``."""

    def __init__(self, input_size: int, hidden_size: int, batch_first: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.batch_first = hidden_size, batch_first
        self.cell = HandWrittenGRUCell(input_size, hidden_size)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = x.new_zeros(x.shape[0], self.hidden_size) if h0 is None else h0[0]
        output = run_over_time(self.cell, x, h)
        h_n = output[:, -1][None]
        return (output if self.batch_first else output.transpose(0, 1)), h_n


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
            y = run_over_time(cell, x, x.new_zeros(x.shape[0], self.hidden_size))
            x = y if i == 0 else x + y
        return self.head(x)
