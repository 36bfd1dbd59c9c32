"""What a rewritten loop computes, for every mode; traced by AOTAutograd.

For ``"dsf"`` and ``"ft"`` (DESIGN.md §1–2):

1. the states are computed once, for values only (``dsf::loop_states``);
2. the step body is applied to all T steps at once with the previous states shifted
   in and detached (``vmap`` over time), so each weight is used by one GEMM over T·B
   rows and the T local VJPs are independent;
3. a feedback node returns the exact states in the forward and, in the backward,
   turns the direct gradients ``g`` into ``δ`` with ``dsf::reverse_linear_scan`` and
   hands ``δ`` to the batched body; the initial carries receive ``λ ⊙ δ_1``.

For ``"bptt"`` the states come from ``dsf::loop_states`` with autograd: exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .loop_ir import LoopIR

MODES = ("dsf", "ft", "bptt")


class StateFeedback(torch.autograd.Function):
    """Identity on the states forward; backward replaces BPTT by ``δ_t = g_t + λ ⊙ δ_{t±1}``.

    Inputs: ``lam``, ``backwards`` (False for reverse-time loops), the number of
    carries ``n``, then ``n`` exact state sequences, ``n`` recomputed ones (the batched
    body, through which ``δ`` reaches weights and inputs) and ``n`` initial carries.
    """

    @staticmethod
    def forward(ctx, lam: Tensor, backwards: bool, n: int, *tensors: Tensor):
        ctx.save_for_backward(lam)
        ctx.backwards, ctx.n = backwards, n
        ctx.sizes = [t.shape[-1] for t in tensors[:n]]
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (lam,) = ctx.saved_tensors
        g = torch.cat(grads, -1) if ctx.n > 1 else grads[0]
        delta = ops.reverse_linear_scan(g, lam, ctx.backwards)
        first = delta[0] if ctx.backwards else delta[-1]
        deltas = delta.split(ctx.sizes, -1)
        inits = (lam.to(first.dtype) * first).split(ctx.sizes, -1)
        return (None, None, None, *([None] * ctx.n), *deltas, *inits)


def previous_states(states: Tensor, init: Tensor, reverse: bool) -> Tensor:
    """The state each step consumed: ``s_{t-1}`` (``s_{t+1}`` for a reverse-time loop)."""
    if reverse:
        return torch.cat([states[1:], init[None]])
    return torch.cat([init[None], states[:-1]])


def batched_body(loop: LoopIR, step_inputs: list[Tensor], previous: list[Tensor], invariants: list[Tensor]):
    """The step body applied to every step at once (time is the vmapped dim 0)."""
    in_dims = (0,) * (len(step_inputs) + len(previous)) + (None,) * len(invariants)
    return torch.func.vmap(loop.body, in_dims=in_dims)(*step_inputs, *previous, *invariants)


def run_loop(
    loop: LoopIR,
    mode: str,
    lam: Tensor | None,
    step_inputs: list[Tensor],
    init_carries: list[Tensor],
    invariants: list[Tensor],
) -> list[Tensor]:
    """All states ``(T, B, size)`` of ``loop``, one per carry, with ``mode``'s gradients."""
    kernel = loop.forward_kernel
    if mode == "bptt":
        return ops.loop_states(kernel, loop.reverse, step_inputs, init_carries, invariants)
    detached = [[t.detach() for t in group] for group in (step_inputs, init_carries, invariants)]
    states = ops.loop_states(kernel, loop.reverse, *detached)
    previous = [previous_states(s, c.detach(), loop.reverse) for s, c in zip(states, init_carries)]
    recomputed = batched_body(loop, step_inputs, previous, invariants)
    n = len(states)
    return list(StateFeedback.apply(lam, not loop.reverse, n, *states, *recomputed, *init_carries))
