"""Highway-BP that picks its own cost: per loop, the fewest refinements k whose gradients
reach a cosine of ``target`` to exact BPTT's.

Every ``every`` backward passes (and at the first), it measures: exact BPTT's δ by the
loop's adjoint, then Highway-BP's ``wᵏ`` for k = 0, 1, … ``max_iterations``, each compared
with it through the loop's own gradients (its weights' and its inputs', the local VJPs of
each δ), stopping at the first k whose cosine reaches ``target`` (else at
``max_iterations``).  In between it runs that k.  The measurement costs an exact backward of
the loop and a VJP per k tried; the report says the k chosen, the cosine measured and
when.  Written only with the public primitives; it keeps state and branches on measured
values, so it runs eagerly (``traced = False``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..fidelity import cosine_and_error
from ..loop_backward import LoopBackward
from ..loop_ir import LoopIR
from .highway import Highway
from .rule import Rule, bound_field


@dataclasses.dataclass
class Measurement:
    """The refinements a loop runs, and the measurement that chose them."""

    iterations: int = 0
    cosine: float | None = None
    backward: int = 0  # the backward pass it was measured at (1: the first)
    calls: int = 0


@dataclasses.dataclass
class Auto(Rule):
    target: float = 0.99
    every: int = 100
    max_iterations: int = 4
    loop: str | None = bound_field()  # the bound loop's name
    traced = False
    keeps_products = False

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target <= 1:
            raise ValueError(f"target must be a cosine in (0, 1], got {self.target!r}")
        for name in ("every", "max_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'every' else 0}, got {value!r}")
        self.measured: dict[str, Measurement] = {}  # loop name -> its measurement, for every loop

    def bind(self, loop: LoopIR) -> Auto:
        Highway().bind(loop)  # refuses a step without a residual path, as Highway-BP does
        bound = dataclasses.replace(self, loop=loop.name)
        bound.measured = self.measured
        return bound

    def deltas(self, loop: LoopBackward) -> Tensor:
        state = self.measured.setdefault(self.loop, Measurement())
        state.calls += 1
        decays = loop.highway_diagonal()
        receiving = loop.shift(decays)  # K_{t+1} multiplies the δ step t receives

        def refined(w: Tensor) -> Tensor:  # one Highway-BP refinement: scan_K(g + shift((J − K)ᵀ w))
            return loop.scan(loop.g + loop.shift(loop.transposed(w) - decays * w), receiving)

        w = loop.scan(loop.g, receiving)
        if state.calls != 1 and state.calls % self.every:
            for _ in range(state.iterations):
                w = refined(w)
            return w
        want = _flat(loop.local_gradients(loop.exact()))
        for k in range(self.max_iterations + 1):
            cosine, _ = cosine_and_error(_flat(loop.local_gradients(w)), want)
            if cosine >= self.target or k == self.max_iterations:
                break
            w = refined(w)
        state.iterations, state.cosine, state.backward = k, cosine, state.calls
        return w

    def describe(self) -> str:
        return f"auto (target {self.target:g})"

    def describe_feedback(self) -> str:
        state = self.measured.get(self.loop)
        if state is None or state.cosine is None:
            return "K, k not measured yet"
        met = "" if state.cosine >= self.target else ", target not met"
        return f"K, k = {state.iterations} (cosine {state.cosine:.4f} at backward {state.backward}{met})"

    def snapshot(self):
        return {name: dataclasses.replace(m) for name, m in self.measured.items()}

    def restore(self, state) -> None:
        self.measured.clear()
        self.measured.update(state)


def _flat(gradients) -> Tensor:
    return torch.cat([g.detach().double().flatten() for group in gradients for g in group])
