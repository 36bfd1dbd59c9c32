"""Custom operators the rewrites put into graphs.

They are opaque to AOTAutograd and Inductor on purpose: each is one node whatever the
sequence length, so compile time does not grow with T, and each picks the fastest
implementation for the device at run time.

* ``dsf::reverse_linear_scan`` — the feedback recurrence ``δ_t = g_t + λ ⊙ δ_{t+1}``
  (λ fixed for DSF, or a decay per step for Highway-BP) where Triton cannot run it (a
  plain loop on CPU; :func:`reverse_linear_scan` picks the Triton kernels of
  :mod:`dsf_compile.triton_scan`, which Inductor schedules, on CUDA).
* ``dsf::loop_states`` — every state of a loop with a known kernel (:mod:`dsf_compile.kernels`),
  for values only: every mode supplies its gradients itself (:mod:`dsf_compile.runtime`);
  with the step's products too where the backward reuses them.
* ``dsf::exact_backward`` — exact BPTT's gradients of a loop: its adjoint loop, and the
  batched VJP for its inputs and weights sharing one recomputation of the forward;
  ``dsf::exact_deltas``, its state gradients alone.
* ``dsf::eager_rule`` — a backward rule that runs eagerly at every backward (it keeps
  state, or branches on values), its δ and initial-state gradient from one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_scan
from .kernels import differentiable, eager_dispatch, exact_deltas, exact_gradients, extra_outputs, run_kernel


def reverse_linear_scan(g: Tensor, lam: Tensor, backwards: bool = True) -> Tensor:
    """``δ_t = g_t + λ ⊙ δ_{t+1}`` over dim 0 with ``δ_{T+1} = 0`` (``backwards``), or
    ``δ_t = g_t + λ ⊙ δ_{t-1}`` with ``δ_0 = 0``; ``g`` is ``(T, ..., S)``.

    ``lam`` is ``(S,)``, one decay for every step (DSF), or ``g``'s shape, a decay per step
    and row (Highway-BP): ``lam[t]`` multiplies the δ that step t receives.
    The Triton kernels where they run (CUDA), else the opaque ``dsf::reverse_linear_scan``.
    """
    if lam.dim() != 1 and lam.shape != g.shape:
        raise ValueError(f"reverse_linear_scan: decay of shape {tuple(lam.shape)}, expected "
                         f"({g.shape[-1]},) or g's shape {tuple(g.shape)}")
    lam = lam.to(accumulator_dtype(g.dtype))
    if triton_scan.runs_on(g.device):
        if lam.dim() == 1:
            return triton_scan.linear_scan(g, lam, backwards)
        return triton_scan.varying_scan(g, lam, backwards)
    return opaque_linear_scan(g, lam, backwards)


@torch.library.custom_op("dsf::reverse_linear_scan", mutates_args=())
def opaque_linear_scan(g: Tensor, lam: Tensor, backwards: bool) -> Tensor:
    """:func:`reverse_linear_scan` as one opaque op.  On a CPU a plain loop of fused
    multiply-adds, which beats every scan formulation there (DESIGN.md §6); on CUDA without
    Triton the chunked form."""
    return looped_linear_scan(g, lam, backwards)


def looped_linear_scan(g: Tensor, lam: Tensor, backwards: bool) -> Tensor:
    """The recurrence as T fused multiply-adds, one per step."""
    delta = torch.empty_like(g)
    steps = range(g.shape[0] - 1, -1, -1) if backwards else range(g.shape[0])
    lam = lam.to(accumulator_dtype(g.dtype))
    varying = lam.dim() > 1
    acc = None
    for t in steps:
        step = g[t].to(lam.dtype)
        acc = step if acc is None else torch.addcmul(step, lam[t] if varying else lam, acc)
        delta[t] = acc
    return delta


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans accumulate in float32 at least: δ sums many terms of decaying size."""
    return torch.promote_types(dtype, torch.float32)


@opaque_linear_scan.register_fake
def _(g: Tensor, lam: Tensor, backwards: bool) -> Tensor:
    return torch.empty_like(g)


def chunked_linear_scan(g: Tensor, lam: Tensor, backwards: bool, chunk: int = 16) -> Tensor:
    """The same recurrence in T/chunk sequential steps instead of T: inside a chunk,
    ``δ_i = Σ_{j≥i} λ^{j−i} g_j`` is one batched contraction with a (chunk × chunk × S)
    matrix of powers of λ; chunks are then linked by ``λ^{chunk−i}`` times the next
    chunk's first δ.  Few, large kernels: the CUDA kernel of the opaque op."""
    if not backwards:
        return chunked_linear_scan(g.flip(0), lam, True, chunk).flip(0)
    length, shape, dtype = g.shape[0], g.shape, g.dtype
    g = g.to(accumulator_dtype(dtype))
    lam = lam.to(g.dtype)
    chunks = -(-length // chunk)
    rows = g.reshape(length, -1, lam.shape[0])
    rows = torch.cat([rows, rows.new_zeros(chunks * chunk - length, *rows.shape[1:])])
    rows = rows.reshape(chunks, chunk, rows.shape[1], rows.shape[2])
    steps = torch.arange(chunk, device=g.device)
    distance = steps[None, :] - steps[:, None]
    powers = torch.where(
        (distance >= 0)[..., None], lam ** distance.clamp(min=0)[..., None].to(g.dtype), lam.new_zeros(())
    )
    local = torch.einsum("ijs,cjrs->cirs", powers, rows)
    firsts = []
    acc = torch.zeros_like(local[0, 0])
    whole = lam**chunk
    for c in range(chunks - 1, -1, -1):
        firsts.append(acc)
        acc = local[c, 0] + whole * acc
    following = torch.stack(firsts[::-1])
    decay = lam ** (chunk - steps)[:, None].to(g.dtype)
    delta = local + decay[None, :, None, :] * following[:, None]
    return delta.reshape(chunks * chunk, *shape[1:])[:length].to(dtype)


@opaque_linear_scan.register_kernel("cuda")
def _(g: Tensor, lam: Tensor, backwards: bool) -> Tensor:
    if lam.dim() > 1:  # (CUDA without Triton) a decay per step has no chunked form here
        return looped_linear_scan(g, lam, backwards)
    return chunked_linear_scan(g, lam, backwards)


@torch.library.custom_op("dsf::loop_states", mutates_args=())
def loop_states(
    kernel: str, reverse: bool, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]
) -> list[Tensor]:
    """Every carried value ``(T, B, size)`` of a loop, by the eager kernel ``kernel``
    (values only: no gradient flows through this op), then whatever else the kernel
    returns at every step (the products a :func:`~dsf_compile.kernels.register_products`
    kernel keeps for the backward)."""
    with torch.no_grad():
        return [s.contiguous() for s in run_kernel(kernel, reverse, step_inputs, carries, invariants)]


@loop_states.register_fake
def _(kernel, reverse, step_inputs, carries, invariants):
    length = step_inputs[0].shape[0]
    extra = extra_outputs(kernel, step_inputs, carries, invariants)
    return [c.new_empty((length, *c.shape)) for c in [*carries, *extra]]


@torch.library.custom_op("dsf::exact_backward", mutates_args=())
def exact_backward(
    kernel: str, reverse: bool, step_inputs: list[Tensor], previous: list[Tensor], direct: list[Tensor],
    init: list[Tensor], invariants: list[Tensor],
) -> list[Tensor]:
    """Exact BPTT's gradients of a loop with adjoint ``kernel``
    (:func:`~dsf_compile.kernels.exact_gradients`): those of the initial carries, then of
    the floating-point step inputs, then of the floating-point invariants."""
    return [g.contiguous() for g in exact_gradients(kernel, reverse, step_inputs, previous, direct, init, invariants)]


@exact_backward.register_fake
def _(kernel, reverse, step_inputs, previous, direct, init, invariants):
    like = [*init, *(step_inputs[i] for i in differentiable(step_inputs)),
            *(invariants[i] for i in differentiable(invariants))]
    return [t.new_empty(t.shape) for t in like]


@torch.library.custom_op("dsf::exact_deltas", mutates_args=())
def opaque_exact_deltas(
    kernel: str, reverse: bool, step_inputs: list[Tensor], previous: list[Tensor], direct: list[Tensor],
    init: list[Tensor], invariants: list[Tensor],
) -> list[Tensor]:
    """Exact BPTT's state gradients of a loop with adjoint ``kernel``, one per carry."""
    return [d.contiguous() for d in exact_deltas(kernel, reverse, step_inputs, previous, direct, init, invariants)]


@opaque_exact_deltas.register_fake
def _(kernel, reverse, step_inputs, previous, direct, init, invariants):
    return [d.new_empty(d.shape) for d in direct]


# key -> the function an eagerly run rule's op calls: (g, step inputs, previous, invariants) -> [δ, initial]
EAGER_RULES: dict = {}


@torch.library.custom_op("dsf::eager_rule", mutates_args=())
def eager_rule(key: str, g: Tensor, step_inputs: list[Tensor], previous: list[Tensor],
               invariants: list[Tensor]) -> list[Tensor]:
    """``[δ, initial-state gradient]`` of the loop and rule registered under ``key``, the
    rule run as ordinary eager code at this backward."""
    with eager_dispatch():
        delta, initial = EAGER_RULES[key](g, step_inputs, previous, invariants)
    return [delta.contiguous(), initial.contiguous()]


@eager_rule.register_fake
def _(key, g, step_inputs, previous, invariants):
    return [g.new_empty(g.shape), g.new_empty(g.shape[1:])]  # contiguous, as the op returns them
