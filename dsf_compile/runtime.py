"""What a rewritten loop computes; traced by AOTAutograd.

1. the states are computed once, for values only (``dsf::loop_states``), on a CPU with the
   step's products with its weights too where the backward reads them
   (:mod:`dsf_compile.step.products`);
2. a feedback node returns them; its backward hands the loop to the loop's rule
   (:mod:`dsf_compile.rules`) as a :class:`~dsf_compile.loop_backward.LoopBackward`: the
   rule forms ``δ`` from the direct gradients, and the gradients of the loop's inputs and
   weights are the step's local VJPs with ``δ``, vmapped over all T steps (one GEMM per
   weight over T·B rows).  Exact BPTT's rule replaces that by its own op, the loop's
   adjoint (``dsf::exact_backward``).

The runtime knows no mode: whatever a rule does, it does through the rule's methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .kernels import SavedProducts, differentiable, filled, register_body, register_products
from .loop_backward import LoopBackward
from .loop_ir import LoopIR
from .rules import Rule, eager_key


@dataclass
class LoopPlan:
    """One loop's rule, bound to it, and what its forward keeps for the backward:
    ``products``, the step's products with its weights (None where the rule does not read
    them or the step has none); ``eager_key``, where a rule that runs eagerly is
    registered; ``compile_step``, whether the loop's sequential kernels are compiled by
    Inductor on a CPU too."""

    rule: Rule
    products: SavedProducts | None
    eager_key: str | None
    compile_step: bool

    @property
    def name(self) -> str:
        return type(self.rule).__name__.lower()


def plan_for(rule: Rule, loop: LoopIR, compile_step: bool) -> LoopPlan:
    """Bind ``rule`` to ``loop`` (at compile time: a rule that refuses the loop raises here)."""
    bound = rule.bind(loop)
    products = register_products(loop, compile_step=compile_step) if bound.keeps_products else None
    key = None if bound.traced else eager_key(bound, loop, compile_step)
    return LoopPlan(bound, products, key, compile_step)


class DiagonalFeedback(torch.autograd.Function):
    """A loop's states, with its rule's backward.

    Forward: returns the exact states (computed beforehand, without autograd).
    Backward: the rule's gradients of the loop's initial carries, step inputs and
    invariants (see the module's docstring).  Nothing of the step is kept for the
    backward but its inputs (and, on a CPU, its products with the weights).
    """

    @staticmethod
    def forward(ctx, loop: LoopIR, plan: LoopPlan, counts: tuple[int, int, int], *tensors: Tensor):
        n_states = counts[0]
        ctx.loop, ctx.plan, ctx.counts = loop, plan, counts
        ctx.save_for_backward(*tensors)
        return tuple(t.view_as(t) for t in tensors[:n_states])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        loop, plan = ctx.loop, ctx.plan
        n_states, n_inputs, n_products = ctx.counts
        saved = ctx.saved_tensors
        states = saved[:n_states]
        step_inputs = saved[n_states : n_states + n_inputs]
        init = saved[n_states + n_inputs : 2 * n_states + n_inputs]
        invariants = saved[2 * n_states + n_inputs : len(saved) - n_products]
        products = saved[len(saved) - n_products :]
        previous = [previous_states(s, c, loop.reverse) for s, c in zip(states, init)]
        backward = LoopBackward(loop, grads, step_inputs, previous, invariants, plan.products, products,
                                compile_step=plan.compile_step)
        initial, x_grads, w_grads = plan.rule.gradients(backward, plan.eager_key)
        init_grads = initial.split(backward.state_sizes, -1)
        step_grads = filled([None] * len(step_inputs), differentiable(step_inputs), x_grads)
        invariant_grads = filled([None] * len(invariants), differentiable(invariants), w_grads)
        return (None, None, None, *([None] * n_states), *step_grads, *init_grads, *invariant_grads,
                *([None] * n_products))


def previous_states(states: Tensor, init: Tensor, reverse: bool) -> Tensor:
    """The state each step consumed: ``s_{t-1}`` (``s_{t+1}`` for a reverse-time loop)."""
    if reverse:
        return torch.cat([states[1:], init[None]])
    return torch.cat([init[None], states[:-1]])


def run_loop(
    loop: LoopIR,
    plan: LoopPlan,
    step_inputs: list[Tensor],
    init_carries: list[Tensor],
    invariants: list[Tensor],
) -> list[Tensor]:
    """All states ``(T, B, size)`` of ``loop``, one per carry, with ``plan``'s gradients.

    On a CPU, where the plan keeps the step's products, the forward runs the step body
    that returns them (stepped, compiled by Inductor under ``compiler="inductor"``) in
    place of the loop's own kernel (torch's fused RNN op for nn.RNN/GRU/LSTM, which keeps
    none of them).  On CUDA the loop's own kernel runs and the backward recomputes them:
    keeping them there has not been measured."""
    if loop.forward_kernel is None:  # a step body of a Python loop or a scan, registered once
        loop.forward_kernel = register_body(loop)
    kernel = loop.forward_kernel
    if plan.products is not None and init_carries[0].device.type == "cpu":
        kernel = plan.products.kernel
    detached = [[t.detach() for t in group] for group in (step_inputs, init_carries, invariants)]
    outputs = ops.loop_states(kernel, loop.reverse, *detached)
    states, products = outputs[: len(init_carries)], outputs[len(init_carries) :]
    counts = (len(states), len(step_inputs), len(products))
    return list(DiagonalFeedback.apply(loop, plan, counts, *states, *step_inputs, *init_carries, *invariants,
                                       *products))
