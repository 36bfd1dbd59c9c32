"""Exact BPTT: the loop's adjoint, ``e_t = J_tᵀ (g_t + e_{t+1})``, ``δ_t = g_t + e_{t+1}``,
run as one op (``dsf::exact_backward``: the adjoint loop with its gradient-free per-step
work batched over time, and the batched VJP for inputs and weights on the same
recomputation of the forward); ``∂L/∂s_0 = e_1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..kernels import register_adjoint
from ..loop_backward import LoopBackward
from .rule import Rule


class ExactBPTT(Rule):
    keeps_products = False  # the adjoint recomputes the step's forward once, for both parts

    def deltas(self, loop: LoopBackward) -> Tensor:
        return loop.exact()

    def gradients(self, loop: LoopBackward, eager_key: str | None = None):
        key = register_adjoint(loop.ir, compile_step=loop._compile_step)
        sizes = loop.state_sizes
        exact = ops.exact_backward(key, loop.reverse, loop._step_inputs, loop._previous,
                                   list(loop.g.split(sizes, -1)), [loop.first(p) for p in loop._previous],
                                   loop._invariants)
        n_x = len(loop._x_slots)
        initial = exact[: len(sizes)]
        return torch.cat(initial, -1), exact[len(sizes) : len(sizes) + n_x], exact[len(sizes) + n_x :]

    def describe(self) -> str:
        return "exact (bptt)"
