"""Highway-BP (Fagnou et al., ICLR 2025; DESIGN.md §7): each step Jacobian split into the
diagonal of its residual path K (a GRU's update gate, an LSTM's forget gate on c) and the
rest, then ``iterations`` refinements,

    w⁰ = scan_K(g),    wⁱ⁺¹ = scan_K(g + shift((J − K)ᵀ wⁱ)),    δ = wᵏ,
    scan_K(u)_t = u_t + K_{t+1} ⊙ scan_K(u)_{t+1},    ∂L/∂s_0 = J_1ᵀ δ_1.

After k refinements the last k + 1 steps are exact (the first k + 1 of a reverse-time
loop); k ≥ T − 1 is exact BPTT, initial state included.  K is found in the step's graph
(:mod:`dsf_compile.step.highway`); a step with no residual path is refused.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .. import ops
from ..kernels import to_receiver
from ..loop_backward import LoopBackward
from ..loop_ir import LoopIR
from ..step.highway import NoHighwayPath, highway_step_of
from .rule import Rule, bound_field

__all__ = ["Highway", "NoHighwayPath", "highway_refinement"]


@dataclasses.dataclass
class Highway(Rule):
    iterations: int = 1
    paths: str = bound_field("")  # the bound loop's carries with a path, as a report says it
    keeps_products = False  # its linearisation is the highway step's

    def __post_init__(self) -> None:
        k = self.iterations
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"iterations must be an int >= 0 (highway refinements), got {k!r}")

    def bind(self, loop: LoopIR) -> Highway:
        step = highway_step_of(loop)
        with_path = [n for n, path in zip(loop.carry_names, step.paths) if path]
        without = [n for n, path in zip(loop.carry_names, step.paths) if not path]
        described = f"K on {', '.join(with_path)}" + (f" (0 on {', '.join(without)})" if without else "")
        return dataclasses.replace(self, paths=described)

    def deltas(self, loop: LoopBackward) -> Tensor:
        decays = loop.highway_diagonal()
        w = loop.scan(loop.g, loop.shift(decays))
        for _ in range(self.iterations):
            w = highway_refinement(loop.g, w, decays, loop.transposed, loop.reverse)
        return w

    def describe(self) -> str:
        return f"highway (k = {self.iterations})"

    def describe_feedback(self) -> str:
        return self.paths or "-"


def highway_refinement(g: Tensor, w: Tensor, decays: Tensor, transposed_product, reverse: bool) -> Tensor:
    """``scan_K(g + v)`` with ``v_t = (J_{t+1} − K_{t+1})ᵀ w_{t+1}``: ``decays[t]`` is ``K``
    at step t and ``transposed_product(w)[t]`` is ``J_tᵀ w_t`` (step t's Jacobian in the
    state it consumed).  The exact δ is its fixed point."""
    rest = transposed_product(w) - decays * w
    receiving = to_receiver(decays, reverse)  # K_{t+1} multiplies the δ step t receives
    return ops.reverse_linear_scan(g + to_receiver(rest, reverse), receiving, not reverse)
