"""FT-BPTT, fully truncated BPTT: λ = 0, so every step's state gradient is its direct
gradient alone and the initial state gets none,

    δ_t = g_t,    ∂L/∂s_0 = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..loop_backward import LoopBackward
from .rule import Rule


class FT(Rule):
    def deltas(self, loop: LoopBackward) -> Tensor:
        return loop.g

    def initial_gradient(self, loop: LoopBackward, delta: Tensor) -> Tensor:
        return torch.zeros_like(loop.first(delta))

    def describe(self) -> str:
        return "ft (λ = 0)"

    def describe_feedback(self) -> str:
        return "const 0"
