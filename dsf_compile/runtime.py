"""What a rewritten loop computes, for every mode; traced by AOTAutograd.

For every mode (DESIGN.md §1–2, §7):

1. the states are computed once, for values only (``dsf::loop_states``);
2. a feedback node returns them; in its backward it turns the direct gradients ``g``
   into ``δ`` — by :func:`~dsf_compile.ops.reverse_linear_scan` with a fixed λ
   (``"dsf"``, ``"ft"``), with a λ estimated from the step's Jacobian diagonal
   (``"dsf"`` with adaptive feedback) or by Highway-BP's iterations (``"highway"``) —
   then takes the VJP of the step body applied to all T steps at once with the previous
   states shifted in and held constant (``vmap`` over time): each weight gets one GEMM
   over T·B rows, the T local VJPs being independent.  On a CPU a diagonal feedback's
   VJP reads the step's products with the weights, kept by the forward
   (:mod:`dsf_compile.passes.save_products`), instead of recomputing them.  Every VJP
   against the states (a Hutchinson probe, a highway iteration) reuses that one
   linearisation.  Exact BPTT
   (``"bptt"``) is one op, ``dsf::exact_backward``: the adjoint loop of
   :func:`~dsf_compile.kernels.register_adjoint` (its per-step work batched over time
   where it reads no gradient) and the same batched VJP, both on one recomputation of
   the forward (:func:`~dsf_compile.kernels.exact_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .feedback import smoothed_feedback
from .kernels import SavedProducts, differentiable, filled, to_receiver
from .loop_ir import LoopIR
from .passes.find_highway import HighwayStep

MODES = ("dsf", "ft", "highway", "bptt")


@dataclass
class GradientRule:
    """How one loop's backward forms ``δ`` from its direct gradients ``g``.

    ``mode``: ``"dsf"``/``"ft"`` (a diagonal feedback: ``lam``, fixed, or estimated at each
    backward when ``adaptive`` names where the estimate is kept), ``"highway"``
    (``iterations`` refinements of the highway scan; ``highway`` runs the step with each
    carry's ``K``) or ``"bptt"`` (exact, by the loop's ``adjoint`` kernel).  ``products``:
    the step's products with its weights, kept by the forward for a diagonal feedback's
    backward to reuse instead of recomputing them (None: the step has none).
    """

    mode: str
    lam: tuple[float, ...] | None = None
    adaptive: str | None = None
    momentum: float = 0.0
    iterations: int = 0
    highway: HighwayStep | None = None
    adjoint: str | None = None
    products: SavedProducts | None = None


class DiagonalFeedback(torch.autograd.Function):
    """A loop's states, with the backward of its :class:`GradientRule`.

    Forward: returns the exact states (computed beforehand, without autograd).
    Backward: ``δ`` against the loop's direction (see the module's docstring), then one
    VJP of the step body vmapped over all T steps (previous states shifted in, held
    constant) for the per-step inputs and invariants.  The initial carries get ``λ ⊙ δ_1``
    under a diagonal feedback, ``J_1ᵀ δ_1`` under Highway-BP (so that enough iterations
    give exact BPTT) and exact BPTT.  The batched recomputation lives in the backward, so
    the forward is the fused recurrence alone and nothing of the body is kept for the
    backward but its inputs.
    """

    @staticmethod
    def forward(ctx, loop: LoopIR, rule: GradientRule, lam: Tensor | None, counts: tuple[int, int, int],
                *tensors: Tensor):
        n_states = counts[0]
        ctx.loop, ctx.rule, ctx.counts = loop, rule, counts
        ctx.save_for_backward(lam, *tensors)
        return tuple(t.view_as(t) for t in tensors[:n_states])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        loop, rule = ctx.loop, ctx.rule
        n_states, n_inputs, n_products = ctx.counts
        lam, *saved = ctx.saved_tensors
        states = saved[:n_states]
        step_inputs = saved[n_states : n_states + n_inputs]
        init = saved[n_states + n_inputs : 2 * n_states + n_inputs]
        invariants = saved[2 * n_states + n_inputs : len(saved) - n_products]
        products = saved[len(saved) - n_products :]
        previous = [previous_states(s, c, loop.reverse) for s, c in zip(states, init)]
        # token ids, masks: inputs of the step that have no gradient
        x_slots, w_slots = differentiable(step_inputs), differentiable(invariants)
        if rule.mode == "bptt":
            exact = ops.exact_backward(rule.adjoint, loop.reverse, list(step_inputs), previous, list(grads),
                                       list(init), list(invariants))
            init_grads = exact[:n_states]
            x_grads, w_grads = exact[n_states : n_states + len(x_slots)], exact[n_states + len(x_slots) :]
        else:
            init_grads, x_grads, w_grads = feedback_gradients(loop, rule, lam, grads, step_inputs, previous,
                                                              invariants, (x_slots, w_slots), products)
        step_grads = filled([None] * len(step_inputs), x_slots, x_grads)
        invariant_grads = filled([None] * len(invariants), w_slots, w_grads)
        return (None, None, None, None, *([None] * n_states), *step_grads, *init_grads, *invariant_grads,
                *([None] * n_products))


def feedback_gradients(loop: LoopIR, rule: GradientRule, lam: Tensor | None, grads, step_inputs, previous,
                       invariants, slots: tuple[list[int], list[int]], products=()):
    """The gradients of a loop's initial carries, differentiable step inputs and
    invariants under an approximate rule (everything but exact BPTT): ``δ`` from the
    direct gradients ``grads``, then one VJP of the step body vmapped over all T steps
    (reading the step's ``products`` kept by the forward, if there are any, instead of
    recomputing them)."""
    x_slots, w_slots = slots
    sizes = [s.shape[-1] for s in previous]
    g = torch.cat(grads, -1) if len(grads) > 1 else grads[0]
    first = -1 if loop.reverse else 0  # the step that consumed the initial carries
    highway = rule.mode == "highway"
    needs_previous = highway or rule.adaptive is not None

    def body_over_time(xs, ws, *prevs):
        xs, ws = filled(step_inputs, x_slots, xs), filled(invariants, w_slots, ws)
        prevs = list(prevs) if prevs else previous
        if highway:  # the highway diagonal K comes with the step, as an auxiliary output
            return batched_highway_body(loop, rule.highway, xs, prevs, ws)
        if products:
            return tuple(batched_body(loop, xs, prevs, ws, rule.products.body, products))
        return tuple(batched_body(loop, xs, prevs, ws))

    primals = (tuple(step_inputs[i] for i in x_slots), tuple(invariants[i] for i in w_slots),
               *(previous if needs_previous else ()))
    if highway:
        _, vjp, decays = torch.func.vjp(body_over_time, *primals, has_aux=True)
    else:
        _, vjp = torch.func.vjp(body_over_time, *primals)

    def pullback(cotangent: Tensor):
        return vjp(tuple(cotangent.split(sizes, -1)))

    def transposed(w: Tensor) -> Tensor:  # J_tᵀ w_t at every step, in the state it consumed
        return torch.cat(pullback(w)[2:], -1)

    if highway:
        delta = highway_deltas(loop, rule, g, decays.to(g.dtype), transposed)
    else:
        if rule.adaptive is not None:
            lam = adaptive_lam(rule, g, transposed)
        delta = ops.reverse_linear_scan(g, lam, not loop.reverse)
    x_grads, w_grads, *previous_grads = pullback(delta)
    if highway:
        init_grads = tuple(p[first] for p in previous_grads)
    else:
        init_grads = (lam.to(delta.dtype) * delta[first]).split(sizes, -1)
    return init_grads, x_grads, w_grads


def adaptive_lam(rule: GradientRule, g: Tensor, transposed_product) -> Tensor:
    """λ = clip(mean over steps and rows of diag J_t, 0, 1) by :func:`mean_jacobian_diagonal`,
    smoothed across backward passes by ``rule.momentum``."""
    estimate = mean_jacobian_diagonal(g, transposed_product)
    return smoothed_feedback(estimate.clamp(0, 1), rule.adaptive, rule.momentum)


def mean_jacobian_diagonal(like: Tensor, transposed_product) -> Tensor:
    """The mean over all rows of ``like`` (T·B of them) of the diagonal of each row's
    Jacobian, by Hutchinson's estimator ``E[v ⊙ Jᵀv] = diag J``: one Rademacher probe
    ``v`` shaped like ``like``, ``transposed_product(v)`` giving every row's ``Jᵀv``.
    Exact for a diagonal J whatever the probe."""
    probe = torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    accumulator = ops.accumulator_dtype(like.dtype)
    products = probe.to(accumulator) * transposed_product(probe).to(accumulator)
    return products.flatten(0, -2).mean(0)


def highway_deltas(loop: LoopIR, rule: GradientRule, g: Tensor, decays: Tensor, transposed_product) -> Tensor:
    """Highway-BP (DESIGN.md §7): ``w⁰ = scan_K(g)``, then ``rule.iterations`` times
    :func:`highway_refinement`; ``scan_K`` is the time-varying diagonal recurrence with
    ``K`` (``decays``: each carry's highway coefficient at every step).  Each iteration is
    one VJP against the states of the shared linearisation and one scan; after k of them
    the last k+1 steps of δ are exact (the first k+1 of a reverse loop)."""
    w = ops.reverse_linear_scan(g, to_receiver(decays, loop.reverse), not loop.reverse)
    for _ in range(rule.iterations):
        w = highway_refinement(g, w, decays, transposed_product, loop.reverse)
    return w


def highway_refinement(g: Tensor, w: Tensor, decays: Tensor, transposed_product, reverse: bool) -> Tensor:
    """``scan_K(g + v)`` with ``v_t = (J_{t+1} − K_{t+1})ᵀ w_{t+1}``: ``decays[t]`` is ``K``
    at step t and ``transposed_product(w)[t]`` is ``J_tᵀ w_t`` (step t's Jacobian in the
    state it consumed).  The exact δ is its fixed point."""
    rest = transposed_product(w) - decays * w
    receiving = to_receiver(decays, reverse)  # K_{t+1} multiplies the δ step t receives
    return ops.reverse_linear_scan(g + to_receiver(rest, reverse), receiving, not reverse)


def batched_highway_body(loop: LoopIR, step: HighwayStep, step_inputs, previous, invariants):
    """:func:`batched_body`, and ``K`` at every step ``(T, B, state size)`` beside it
    (zeros on a carry without a highway path)."""
    def one_step(*args):
        outputs, coefficients = step.run(*args)
        return tuple(outputs), torch.cat([torch.zeros_like(o) if k is None else k.expand_as(o)
                                          for o, k in zip(outputs, coefficients)], -1)

    in_dims = (0,) * (len(step_inputs) + len(previous)) + (None,) * len(invariants)
    outputs, decays = torch.func.vmap(one_step, in_dims=in_dims)(*step_inputs, *previous, *invariants)
    return outputs, decays.detach()


def highway_rule(loop: LoopIR, iterations: int) -> GradientRule | None:
    """The Highway-BP rule of ``loop``; None if no carry has a highway path."""
    step = HighwayStep(loop.body, loop.num_step_inputs, len(loop.carry_sizes))
    if not any(step.paths):
        return None
    return GradientRule("highway", iterations=iterations, highway=step)


def previous_states(states: Tensor, init: Tensor, reverse: bool) -> Tensor:
    """The state each step consumed: ``s_{t-1}`` (``s_{t+1}`` for a reverse-time loop)."""
    if reverse:
        return torch.cat([states[1:], init[None]])
    return torch.cat([init[None], states[:-1]])


def batched_body(loop: LoopIR, step_inputs: list[Tensor], previous: list[Tensor], invariants: list[Tensor],
                 body: torch.fx.GraphModule | None = None, per_step: tuple[Tensor, ...] = ()):
    """The step body (``loop``'s, or ``body`` taking ``per_step``'s slices after its own
    inputs) applied to every step at once (time is the vmapped dim 0)."""
    in_dims = (0,) * (len(step_inputs) + len(previous)) + (None,) * len(invariants) + (0,) * len(per_step)
    body = loop.body if body is None else body
    return torch.func.vmap(body, in_dims=in_dims)(*step_inputs, *previous, *invariants, *per_step)


def run_loop(
    loop: LoopIR,
    rule: GradientRule,
    step_inputs: list[Tensor],
    init_carries: list[Tensor],
    invariants: list[Tensor],
) -> list[Tensor]:
    """All states ``(T, B, size)`` of ``loop``, one per carry, with ``rule``'s gradients.

    On a CPU, where ``rule`` keeps the step's products, the forward runs the step body
    that returns them (stepped, compiled by Inductor under ``compiler="inductor"``) in
    place of the loop's own kernel (torch's fused RNN op for nn.RNN/GRU/LSTM, which keeps
    none of them).  On CUDA the loop's own kernel runs and the backward recomputes them:
    keeping them there has not been measured.

    A fixed λ enters the traced program as floats turned into a tensor inside it (a tensor
    captured from the backend would be a real tensor among fake ones), in float32 even for
    16-bit models, whose rounding would turn decays near 1 into 1."""
    kernel = loop.forward_kernel
    reference = init_carries[0]
    lam = None
    if rule.lam is not None:
        lam = torch.tensor(rule.lam, dtype=ops.accumulator_dtype(reference.dtype), device=reference.device)
    keep_products = rule.products is not None and reference.device.type == "cpu"
    if keep_products:
        kernel = rule.products.kernel
    detached = [[t.detach() for t in group] for group in (step_inputs, init_carries, invariants)]
    outputs = ops.loop_states(kernel, loop.reverse, *detached)
    states, products = outputs[: len(init_carries)], outputs[len(init_carries) :]
    counts = (len(states), len(step_inputs), len(products))
    return list(DiagonalFeedback.apply(loop, rule, lam, counts, *states, *step_inputs, *init_carries, *invariants,
                                       *products))
