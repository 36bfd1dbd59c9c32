"""DSF with adaptive λ (DESIGN.md §7): λ per loop the clipped mean over steps and rows of
each step Jacobian's diagonal, estimated at every backward by Hutchinson's estimator (one
Rademacher probe v: E[v ⊙ Jᵀv] = diag J, exact for a diagonal J), smoothed across
backward passes,

    λ = momentum · λ_previous + (1 − momentum) · clip(mean_{t,b} v ⊙ J_tᵀ v, 0, 1),
    δ_t = g_t + λ ⊙ δ_{t+1},    ∂L/∂s_0 = λ ⊙ δ_1.
"""

from __future__ import annotations

import dataclasses
import uuid

from torch import Tensor

from .. import ops
from ..feedback import register_estimates, smoothed_feedback, summarize
from ..kernels import rademacher_like
from ..loop_backward import LoopBackward
from ..loop_ir import LoopIR
from .rule import Rule, bound_field

DEFAULT_MOMENTUM = 0.9


@dataclasses.dataclass
class Adaptive(Rule):
    momentum: float = DEFAULT_MOMENTUM
    key: str = bound_field(default_factory=lambda: uuid.uuid4().hex)  # names this apply's estimates
    loop: str | None = bound_field()  # the bound loop's name

    def __post_init__(self) -> None:
        momentum = self.momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a float in [0, 1) (smoothing of adaptive λ), got {momentum!r}")
        self.estimates = register_estimates(self.key)  # loop name -> its latest λ

    def bind(self, loop: LoopIR) -> Adaptive:
        return dataclasses.replace(self, loop=loop.name)  # the same key: one table for every loop

    def deltas(self, loop: LoopBackward) -> Tensor:
        estimate = mean_jacobian_diagonal(loop.g, loop.transposed, loop.probe())
        lam = smoothed_feedback(estimate.clamp(0, 1), f"{self.key}/{self.loop}", float(self.momentum))
        loop.memo["lam"] = lam
        return loop.scan(loop.g, lam)

    def initial_gradient(self, loop: LoopBackward, delta: Tensor) -> Tensor:
        return loop.memo["lam"].to(delta.dtype) * loop.first(delta)

    def describe(self) -> str:
        return "dsf"

    def describe_feedback(self) -> str:
        estimate = self.estimates.get(self.loop)
        if estimate is None:
            return f"adaptive (momentum {self.momentum:g})"
        return f"adaptive, now {summarize(estimate)}"

    def snapshot(self):
        return dict(self.estimates)

    def restore(self, state) -> None:
        self.estimates.clear()
        self.estimates.update(state)


def mean_jacobian_diagonal(like: Tensor, transposed_product, probe: Tensor | None = None) -> Tensor:
    """The mean over all rows of ``like`` (T·B of them) of the diagonal of each row's
    Jacobian, by Hutchinson's estimator ``E[v ⊙ Jᵀv] = diag J``: one Rademacher probe
    ``v`` shaped like ``like`` (``probe``, or one drawn here), ``transposed_product(v)``
    giving every row's ``Jᵀv``.  Exact for a diagonal J whatever the probe."""
    if probe is None:
        probe = rademacher_like(like)
    accumulator = ops.accumulator_dtype(like.dtype)
    products = probe.to(accumulator) * transposed_product(probe).to(accumulator)
    return products.flatten(0, -2).mean(0)
