"""The PTB word-level language model of the paper (DESIGN.md §5)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .cell_lm import HandWrittenGRU

# "gru-loop": the same GRU written by hand and stepped in a Python loop (re-rolled by
# dsf_compile instead of being one recurrent op).
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN, "gru-loop": HandWrittenGRU}


class RNNLanguageModel(nn.Module):
    """Embedding → stacked single-layer recurrent modules with residual skips → linear head.

    The embedding width equals the hidden size; no dropout, no layer norm.  Layers are
    separate modules so that residual connections can sit between them.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 3, cell: str = "gru") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell={cell!r}: expected one of {', '.join(CELLS)}")
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(CELLS[cell](hidden_size, hidden_size, batch_first=True) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` for tokens ``(B, T)``."""
        x = self.embedding(tokens)
        for i, layer in enumerate(self.layers):
            y = layer(x)[0]
            x = y if i == 0 else x + y
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def masked_cross_entropy(logits: Tensor, targets: Tensor, pad: int) -> Tensor:
    """Mean next-token loss over non-padding targets."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad)


__all__ = ["RNNLanguageModel", "count_parameters", "masked_cross_entropy"]
