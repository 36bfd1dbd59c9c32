"""What a rewritten loop computes, for every mode; traced by AOTAutograd.

For ``"dsf"`` and ``"ft"`` (DESIGN.md §1–2):

1. the states are computed once, for values only (``dsf::loop_states``);
2. a feedback node returns them; in its backward it turns the direct gradients ``g``
   into ``δ`` with :func:`~dsf_compile.ops.reverse_linear_scan` (Triton kernels on
   CUDA, the opaque ``dsf::reverse_linear_scan`` elsewhere), then takes the VJP of the
   step body applied to all T steps at once with the previous states shifted in and held
   constant (``vmap`` over time): each weight gets one GEMM over T·B rows, the T local
   VJPs being independent; the initial carries receive ``λ ⊙ δ_1``.

For ``"bptt"`` the states come from ``dsf::loop_states`` with autograd: exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .loop_ir import LoopIR

MODES = ("dsf", "ft", "bptt")


class DiagonalFeedback(torch.autograd.Function):
    """A loop's states, with the DSF backward.

    Forward: returns the exact states (computed beforehand, without autograd).
    Backward: ``δ = reverse_linear_scan(g, λ)`` against the loop's direction, then one
    VJP of the step body vmapped over all T steps (previous states shifted in, held
    constant) for the per-step inputs and invariants; the initial carries get ``λ ⊙ δ_1``.
    The batched recomputation lives in the backward, so the forward is the fused
    recurrence alone and nothing of the body is kept for the backward but its inputs.
    """

    @staticmethod
    def forward(ctx, loop: LoopIR, lam: Tensor, counts: tuple[int, int], *tensors: Tensor):
        n_states, _ = counts
        ctx.loop, ctx.counts = loop, counts
        ctx.save_for_backward(lam, *tensors)
        return tuple(t.view_as(t) for t in tensors[:n_states])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        loop = ctx.loop
        n_states, n_inputs = ctx.counts
        lam, *saved = ctx.saved_tensors
        states = saved[:n_states]
        step_inputs = saved[n_states : n_states + n_inputs]
        init = saved[n_states + n_inputs : 2 * n_states + n_inputs]
        invariants = saved[2 * n_states + n_inputs :]
        sizes = [s.shape[-1] for s in states]
        g = torch.cat(grads, -1) if n_states > 1 else grads[0]
        delta = ops.reverse_linear_scan(g, lam, not loop.reverse)
        first = delta[-1] if loop.reverse else delta[0]
        previous = [previous_states(s, c, loop.reverse) for s, c in zip(states, init)]

        # token ids, masks: inputs of the step that have no gradient
        x_slots, w_slots = ops.differentiable(step_inputs), ops.differentiable(invariants)

        def body_over_time(xs, ws):
            xs, ws = ops.filled(step_inputs, x_slots, xs), ops.filled(invariants, w_slots, ws)
            return tuple(batched_body(loop, xs, previous, ws))

        _, vjp = torch.func.vjp(body_over_time, tuple(step_inputs[i] for i in x_slots),
                                tuple(invariants[i] for i in w_slots))
        x_grads, w_grads = vjp(tuple(delta.split(sizes, -1)))
        step_grads = ops.filled([None] * len(step_inputs), x_slots, x_grads)
        invariant_grads = ops.filled([None] * len(invariants), w_slots, w_grads)
        init_grads = (lam.to(first.dtype) * first).split(sizes, -1)
        return (None, None, None, *([None] * n_states), *step_grads, *init_grads, *invariant_grads)


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
    lam_values: list[float] | None,
    step_inputs: list[Tensor],
    init_carries: list[Tensor],
    invariants: list[Tensor],
) -> list[Tensor]:
    """All states ``(T, B, size)`` of ``loop``, one per carry, with ``mode``'s gradients.

    λ enters the traced program as floats turned into a tensor inside it (a tensor
    captured from the backend would be a real tensor among fake ones), in float32 even
    for 16-bit models, whose rounding would turn decays near 1 into 1."""
    kernel = loop.forward_kernel
    if mode == "bptt":
        return ops.loop_states(kernel, loop.reverse, step_inputs, init_carries, invariants)
    reference = init_carries[0]
    lam = torch.tensor(lam_values, dtype=ops.accumulator_dtype(reference.dtype), device=reference.device)
    detached = [[t.detach() for t in group] for group in (step_inputs, init_carries, invariants)]
    states = ops.loop_states(kernel, loop.reverse, *detached)
    counts = (len(states), len(step_inputs))  # the rest of the tensors are invariants
    return list(DiagonalFeedback.apply(loop, lam, counts, *states, *step_inputs, *init_carries, *invariants))
