"""What a backward rule sees of one loop: its direct gradients and the primitives that act
on one linearisation of its step (DESIGN.md §9).

A rule (:class:`dsf_compile.Rule`) turns ``loop.g`` into the state gradients ``δ``; the
weights' and the inputs' gradients are then the step's local VJPs with ``δ``, batched
over all T steps, whatever the rule.  Every primitive below that needs the step's
Jacobian (``transposed``, ``highway_diagonal``, the final VJPs) reads one linearisation
of the step, evaluated once for all T steps and built at the first primitive that needs
it, in the cheapest form that serves it:

* the weights' and inputs' VJPs alone: the step's products with its weights, kept by the
  forward on a CPU, are read back instead of recomputed;
* ``transposed``: the same, with the states each step consumed as inputs of the VJP too;
* ``highway_diagonal``: the step run with each carry's residual coefficient beside it.

All of it runs inside the loop's backward, which AOTAutograd traces into the backward
graph (see :class:`dsf_compile.Rule` for rules that run eagerly instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops
from .kernels import differentiable, filled, rademacher_like, register_adjoint, to_receiver
from .loop_ir import LoopIR
from .step.highway import HighwayStep, highway_step_of

# what each linearisation serves: the VJPs of inputs and weights ("local"), those against the
# consumed states too ("transposed"), and with the highway diagonal beside them ("highway")
_SERVES = {"local": {"local"}, "transposed": {"local", "transposed"}, "highway": {"local", "transposed", "highway"}}


class LoopBackward:
    """One loop, during one backward.

    ``g``: the direct gradients of its states, ``(T, B, S)`` in time order, ``S`` the sum of
    ``state_sizes`` (the carries concatenated in the order the step computes them).
    ``reverse``: whether the loop runs backwards in time (its δ recursion then runs
    forwards).  ``memo``: a dict a rule may use to keep values between its ``deltas`` and
    its ``initial_gradient`` in this backward.  ``ir``: the loop's :class:`LoopIR`.
    """

    def __init__(self, loop: LoopIR, grads: Sequence[Tensor], step_inputs: Sequence[Tensor],
                 previous: Sequence[Tensor], invariants: Sequence[Tensor], products=None,
                 saved: Sequence[Tensor] = (), compile_step: bool = False) -> None:
        self.ir = loop
        self.g = torch.cat(list(grads), -1) if len(grads) > 1 else grads[0]
        if loop.padded_after is not None:
            self.g = gathered_onto_last_real_step(self.g, step_inputs[loop.padded_after])
        self.reverse = loop.reverse
        self.state_sizes = tuple(int(p.shape[-1]) for p in previous)
        self.length, self.batch = self.g.shape[0], self.g.shape[1]
        self.memo: dict = {}
        self._step_inputs, self._previous, self._invariants = list(step_inputs), list(previous), list(invariants)
        self._products, self._saved = products, tuple(saved)
        self._compile_step = compile_step
        self._x_slots, self._w_slots = differentiable(self._step_inputs), differentiable(self._invariants)
        self._kind: str | None = None
        self._pullback = None
        self._diagonal: Tensor | None = None

    # --- the primitives ---

    def scan(self, values: Tensor, decay: float | Sequence[float] | Tensor) -> Tensor:
        """``δ_t = values_t + decay ⊙ δ_{t+1}`` against the loop's direction (``δ_{t-1}``
        for a reverse-time loop), from zero past the last step: the fused scan kernel.
        ``decay``: a number, one value per state unit ``(S,)``, or one per step and row
        ``(T, B, S)``, where ``decay[t]`` multiplies the δ that step t receives from the step
        after it (for a coefficient of the transition *into* step t + 1, pass
        ``loop.shift(coefficient)``)."""
        if isinstance(decay, Tensor):
            decay = decay.to(values.device)
            if decay.dim() == 0:
                decay = decay.expand(values.shape[-1])
        else:
            decay = torch.as_tensor(decay, dtype=ops.accumulator_dtype(values.dtype), device=values.device)
            decay = decay.expand(values.shape[-1]) if decay.dim() == 0 else decay
        if decay.dim() == 1 and decay.shape[0] != values.shape[-1]:
            raise ValueError(f"loop.scan: decay of {decay.shape[0]} values for a state of {values.shape[-1]} units")
        return ops.reverse_linear_scan(values, decay, not self.reverse)

    def transposed(self, w: Tensor) -> Tensor:
        """``J_tᵀ w_t`` at every step ``(T, B, S)``: step t's Jacobian in the state it
        consumed (``s_{t-1}``), applied to ``w_t``, through the one linearisation."""
        self._linearise("transposed")
        return torch.cat(self._pullback(w)[2:], -1)

    def highway_diagonal(self) -> Tensor:
        """``K`` at every step ``(T, B, S)``: the derivative of each carry's new value in its
        old one along the step's residual path (a GRU's update gate, an LSTM's forget gate
        on ``c``, 1 where a padding mask keeps the state), 0 on a carry without one.  Raises
        ``ValueError`` for a loop whose step has no such path on any carry."""
        if self._diagonal is None:
            self._linearise("highway")
        return self._diagonal

    def probe(self) -> Tensor:
        """A Rademacher tensor (±1) shaped like ``g``."""
        return rademacher_like(self.g)

    def shift(self, per_step: Tensor) -> Tensor:
        """Values computed at step t moved to the step whose δ they feed: t − 1 (t + 1 for a
        reverse-time loop), zeros where no step does."""
        return to_receiver(per_step, self.reverse)

    def first(self, per_step: Tensor) -> Tensor:
        """The row of ``per_step`` at the step that consumed the initial state."""
        return per_step[-1 if self.reverse else 0]

    def exact(self) -> Tensor:
        """Exact BPTT's δ for this loop, by its adjoint loop (what ``mode="bptt"`` runs): as
        costly as an exact backward of the loop."""
        key = register_adjoint(self.ir, compile_step=self._compile_step)
        first = -1 if self.reverse else 0
        init = [p[first] for p in self._previous]
        deltas = ops.opaque_exact_deltas(key, self.reverse, self._step_inputs, self._previous,
                                  list(self.g.split(self.state_sizes, -1)), init, self._invariants)
        return torch.cat(deltas, -1)

    def local_gradients(self, delta: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The gradients of the loop's floating-point step inputs and invariants given its
        state gradients ``delta``: every step's VJP with its consumed state held constant."""
        if self._kind is None:
            self._linearise("local")
        x_grads, w_grads, *_ = self._pullback(delta)
        return x_grads, w_grads

    # --- the one linearisation ---

    def _linearise(self, need: str) -> None:
        """Build the linearisation that serves ``need`` ("local", "transposed", "highway")
        unless the one there already does; the highway diagonal after a plain
        linearisation is one more evaluation of the step."""
        if self._kind is not None and need in _SERVES[self._kind]:
            return
        if self._kind == "transposed" and need == "highway":
            self._diagonal = self._highway_values()
            return
        with_previous = need != "local"
        primals = (tuple(self._step_inputs[i] for i in self._x_slots),
                   tuple(self._invariants[i] for i in self._w_slots),
                   *(self._previous if with_previous else ()))
        sizes = self.state_sizes
        if need == "highway":
            step = highway_step_of(self.ir)
            _, vjp, diagonal = torch.func.vjp(lambda xs, ws, *prevs: self._batched_highway(step, xs, ws, prevs),
                                              *primals, has_aux=True)
            self._diagonal = diagonal.to(self.g.dtype)
        else:
            _, vjp = torch.func.vjp(lambda xs, ws, *prevs: self._batched(xs, ws, prevs), *primals)
        self._pullback = lambda cotangent: vjp(tuple(cotangent.split(sizes, -1)))
        self._kind = need

    def _inputs(self, xs, ws, prevs):
        return (filled(self._step_inputs, self._x_slots, xs), filled(self._invariants, self._w_slots, ws),
                list(prevs) if prevs else self._previous)

    def _batched(self, xs, ws, prevs) -> tuple[Tensor, ...]:
        """The step body applied to every step at once (time the vmapped dim), reading the
        forward's products with the weights where it kept them."""
        xs, ws, prevs = self._inputs(xs, ws, prevs)
        if self._products is not None and self._saved:
            return tuple(batched_body(self.ir, xs, prevs, ws, self._products.body, self._saved))
        return tuple(batched_body(self.ir, xs, prevs, ws))

    def _batched_highway(self, step: HighwayStep, xs, ws, prevs):
        """:meth:`_batched` of the highway step, with ``K`` at every step as auxiliary output."""
        xs, ws, prevs = self._inputs(xs, ws, prevs)

        def one_step(*args):
            outputs, coefficients = step.run(*args)
            return tuple(outputs), torch.cat([torch.zeros_like(o) if k is None else k.expand_as(o)
                                              for o, k in zip(outputs, coefficients)], -1)

        in_dims = (0,) * (len(xs) + len(prevs)) + (None,) * len(ws)
        outputs, diagonal = torch.func.vmap(one_step, in_dims=in_dims)(*xs, *prevs, *ws)
        return outputs, diagonal.detach()

    def _highway_values(self) -> Tensor:
        with torch.no_grad():
            _, diagonal = self._batched_highway(highway_step_of(self.ir), (), (), ())
        return diagonal.to(self.g.dtype)


def batched_body(loop: LoopIR, step_inputs: list[Tensor], previous: list[Tensor], invariants: list[Tensor],
                 body: torch.fx.GraphModule | None = None, per_step: tuple[Tensor, ...] = ()):
    """The step body (``loop``'s, or ``body`` taking ``per_step``'s slices after its own
    inputs) applied to every step at once (time is the vmapped dim 0)."""
    in_dims = (0,) * (len(step_inputs) + len(previous)) + (None,) * len(invariants) + (0,) * len(per_step)
    body = loop.body if body is None else body
    return torch.func.vmap(body, in_dims=in_dims)(*step_inputs, *previous, *invariants, *per_step)


def gathered_onto_last_real_step(g: Tensor, real: Tensor) -> Tensor:
    """The direct gradients of a loop whose rows are padded after their last real step
    (``real``: ``(T, B, 1)``, True on real steps): a padded step's state is the last real
    one, unchanged, so its gradient is that state's.  Moving it there leaves every padded
    step with none, and every rule computes each row's δ over its own length (a final
    state's gradient entering at the row's last real step) without knowing of padding."""
    real = real.to(g.dtype)
    last = real - torch.cat([real[1:], torch.zeros_like(real[:1])])  # 1 at each row's last real step
    return g * real + last * (g * (1 - real)).sum(0, keepdim=True)
