"""The protocol every backward rule follows, the library's own and a user's alike."""

from __future__ import annotations

import dataclasses
import uuid

from torch import Tensor

from ..loop_backward import LoopBackward
from ..loop_ir import LoopIR


class Rule:
    """How a loop's backward forms its state gradients ``δ`` from its direct gradients ``g``.

    A rule writes :meth:`deltas`, with the primitives of :class:`LoopBackward` (``loop.g``,
    ``loop.scan``, ``loop.transposed``, ``loop.highway_diagonal``, ``loop.probe``,
    ``loop.shift``, ``loop.first``, ``loop.exact``); everything else is shared: the forward,
    the gradients of the loop's inputs and weights (the step's local VJPs with ``δ``,
    batched over all T steps).  ``apply(model, mode=MyRule(...))`` trains every loop with
    it.

    * :meth:`bind` (optional) is called once per loop when the model is compiled and may
      return a rule specialised to it (λ of its state size, say), or raise to refuse it.
    * :meth:`initial_gradient` (optional): the gradient of the loop's initial state; by
      default the first step's exact local VJP, ``J_1ᵀ δ_1``.
    * :meth:`describe`: what ``explain()`` and ``report()`` show in their ``rewrite``
      column; :meth:`describe_feedback` their ``λ`` column.

    ``deltas`` runs inside the backward that AOTAutograd traces: it is traced once and
    then compiled with the rest, so it must not branch on tensor values or keep state
    between calls.  A rule that does (one that measures and adapts) sets ``traced =
    False``: it then runs as eager PyTorch at every backward, inside one opaque op, on a
    linearisation of its own (one more evaluation of the step).  ``keeps_products = False``
    tells the forward not to keep the step's products with its weights for the backward
    (rules whose linearisation is the highway step's do not read them).
    """

    traced: bool = True
    keeps_products: bool = True

    def bind(self, loop: LoopIR) -> Rule:
        return self

    def deltas(self, loop: LoopBackward) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define deltas(self, loop) -> Tensor")

    def initial_gradient(self, loop: LoopBackward, delta: Tensor) -> Tensor:
        return loop.first(loop.transposed(delta))

    def describe(self) -> str:
        return type(self).__name__

    def describe_feedback(self) -> str:
        return "-"

    def gradients(self, loop: LoopBackward, eager_key: str | None = None):
        """(initial-state gradient ``(B, S)``, step inputs' gradients, invariants' gradients):
        ``δ`` by the rule (eagerly, through the op registered under ``eager_key``, for a rule
        that is not traced), then the batched local VJPs."""
        if eager_key is None:
            delta = self.deltas(loop)
            initial = self.initial_gradient(loop, delta)
        else:
            from .. import ops

            delta, initial = ops.eager_rule(eager_key, loop.g, loop._step_inputs, loop._previous, loop._invariants)
        x_grads, w_grads = loop.local_gradients(delta)
        return initial, x_grads, w_grads

    def snapshot(self):
        """What the rule keeps between backward passes (adaptive estimates, measurements), to
        be put back by :meth:`restore` after a backward that must leave no trace
        (``gradient_fidelity``'s)."""
        return None

    def restore(self, state) -> None:
        pass


def eager_key(rule: Rule, loop: LoopIR, compile_step: bool) -> str:
    """Register ``rule`` (bound to ``loop``) to run eagerly in ``dsf::eager_rule``; its key."""
    from .. import ops

    key = uuid.uuid4().hex

    def run(g: Tensor, step_inputs, previous, invariants):
        backward = LoopBackward(loop, list(g.split([p.shape[-1] for p in previous], -1)), step_inputs, previous,
                                invariants, compile_step=compile_step)
        delta = rule.deltas(backward)
        return delta, rule.initial_gradient(backward, delta)

    ops.EAGER_RULES[key] = run
    return key


def bound_field(default=None, default_factory=None):
    """A dataclass field a rule fills in when it is bound to a loop (its λ, its name), not
    an option of its mode."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"bound": True})
    return dataclasses.field(default=default, metadata={"bound": True})
