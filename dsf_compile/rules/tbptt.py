"""Sliding-window truncated BPTT: every loss term backpropagates exactly through its last
``window`` transitions, and no further.  Highway-BP with K = 0, written only with the
public primitives:

    w⁰ = g,    wⁱ⁺¹ = g + shift(Jᵀ wⁱ),    δ = w^window,

so δ_t holds the loss terms of steps t … t + window; the initial state gets those within
the window too, ``J_1ᵀ w^{window−1}_1`` (0 for window 0).  window = 0 is FT; window ≥ T − 1
gives BPTT's state, input and weight gradients, and window ≥ T its initial-state gradient
as well.  It is the approximation practitioners know, and costs one VJP of the step per
unit of window: the baseline a rule of equal cost must beat.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..loop_backward import LoopBackward
from .rule import Rule


@dataclasses.dataclass
class TruncatedBPTT(Rule):
    window: int = 1

    def __post_init__(self) -> None:
        k = self.window
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"window must be an int >= 0 (transitions each loss term backpropagates through), "
                             f"got {k!r}")

    def deltas(self, loop: LoopBackward) -> Tensor:
        w = loop.g
        for _ in range(self.window):
            through = loop.transposed(w)  # J_tᵀ w_t: one more transition, at the step before
            w = loop.g + loop.shift(through)
        loop.memo["last transition"] = through if self.window else None
        return w

    def initial_gradient(self, loop: LoopBackward, delta: Tensor) -> Tensor:
        through = loop.memo["last transition"]
        return torch.zeros_like(loop.first(delta)) if through is None else loop.first(through)

    def describe(self) -> str:
        return f"tbptt (window {self.window})"
