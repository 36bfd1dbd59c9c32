"""DSF, diagonal state feedback (DESIGN.md §1): every step Jacobian replaced by one fixed
diagonal λ,

    δ_t = g_t + λ ⊙ δ_{t+1},    δ_{T+1} = 0,    ∂L/∂s_0 = λ ⊙ δ_1,

a linear time-invariant recurrence run as one fused scan.  λ per loop from ``feedback``:
``"linspace"`` (linspace(0, 1, S), the paper's), ``"uniform"`` (U[0, 1) drawn from ``seed``
and the loop's name), a number, a 1-D tensor, or a callable ``LoopIR -> λ``.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
from torch import Tensor

from ..feedback import Feedback, resolve_feedback, summarize
from ..loop_backward import LoopBackward
from ..loop_ir import LoopIR
from .rule import Rule, bound_field


@dataclasses.dataclass
class DSF(Rule):
    feedback: Feedback = "linspace"
    seed: int = 0
    lam: tuple[float, ...] | None = bound_field()  # the bound loop's λ

    def bind(self, loop: LoopIR) -> DSF:
        # seeded by the loop's name, not by discovery order: λ survives recompilation
        seed = self.seed + zlib.crc32(loop.name.encode())
        return dataclasses.replace(self, lam=tuple(resolve_feedback(self.feedback, loop, seed).tolist()))

    def deltas(self, loop: LoopBackward) -> Tensor:
        return loop.scan(loop.g, self.lam)

    def initial_gradient(self, loop: LoopBackward, delta: Tensor) -> Tensor:
        return torch.tensor(self.lam, dtype=delta.dtype, device=delta.device) * loop.first(delta)

    def describe(self) -> str:
        return "dsf"

    def describe_feedback(self) -> str:
        return "-" if self.lam is None else summarize(torch.tensor(self.lam, dtype=torch.float64))
