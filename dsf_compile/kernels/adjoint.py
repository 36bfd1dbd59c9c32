"""Exact BPTT's backward as a kernel: the loop's adjoint, its gradient-free per-step work
hoisted into batched ops over T, and the batched VJP for inputs and weights on the same
recomputation of the forward."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

from ..step.hoist import HoistedBody, hoist_step_inputs
from .registry import _ADJOINTS, _BODIES, _COMPILED_ON_CPU
from .run import run_kernel
from .tensors import differentiable, eager_dispatch, filled, signature, to_receiver

_ADJOINT_PARTS: dict[str, AdjointParts] = {}


@dataclass
class AdjointParts:
    """Adjoint ``key`` traced for one signature: ``name``, the registered kernel of its
    sequential part (reading ``pre``'s outputs when there is a ``pre``); ``pre``, its
    gradient-free per-step part, which recomputes the step's forward on the way;
    ``state_slots``, where among ``pre``'s outputs the step's new states are (None when they
    are not all there: the forward is then recomputed on its own)."""

    name: str
    pre: torch.fx.GraphModule | None
    state_slots: list[int] | None


def adjoint_parts(key: str, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]) -> AdjointParts:
    """The parts of adjoint ``key`` for inputs like these (``step_inputs``: the loop's own,
    the states each step consumed and the direct gradients; ``carries``: the received
    gradients ``e``).  The step's VJP against its carries is traced to an aten graph that
    also returns the step's new states, then hoisted: its per-step part holds the whole
    forward of the step, so the one batched recomputation of the forward serves both the
    adjoint loop and the VJP for the loop's inputs and weights."""
    examples = [*(x[0] for x in step_inputs), *carries, *invariants]
    name = f"{key}@" + hashlib.sha1(repr(signature(examples)).encode()).hexdigest()[:16]
    if name not in _ADJOINT_PARTS:
        from torch.fx.experimental.proxy_tensor import make_fx

        body, n_x, n_c = _ADJOINTS[key]

        def adjoint_step(*args: Tensor) -> tuple[Tensor, ...]:
            xs, previous, ws = args[:n_x], args[n_x : n_x + n_c], args[n_x + 3 * n_c :]
            direct, received = args[n_x + n_c : n_x + 2 * n_c], args[n_x + 2 * n_c : n_x + 3 * n_c]
            states, pullback = torch.func.vjp(lambda *carried: tuple(body(*xs, *carried, *ws)), *previous)
            return (*pullback(tuple(g + e for g, e in zip(direct, received))), *states)

        with eager_dispatch():
            graph = make_fx(adjoint_step)(*(t.detach() for t in examples))
        hoisted = hoist_step_inputs(graph, len(step_inputs), len(carries))
        sequential = copy.deepcopy(hoisted.rest.graph)
        output = next(n for n in sequential.nodes if n.op == "output")
        values = list(output.args[0])
        output.args = (tuple(values[: len(carries)]),)
        sequential.eliminate_dead_code()
        _BODIES[name] = HoistedBody(None, torch.fx.GraphModule(hoisted.rest, sequential))
        # the new states, if the per-step part computes them all: placeholders of the rest
        per_step = [n for n in sequential.nodes if n.op == "placeholder"][: -len(carries) - len(invariants)]
        states = values[len(carries) :]
        shared = hoisted.pre is not None and all(s in per_step for s in states)
        slots = [per_step.index(s) for s in states] if shared else None
        _ADJOINT_PARTS[name] = AdjointParts(name, hoisted.pre, slots)
        if key in _COMPILED_ON_CPU:
            _COMPILED_ON_CPU.add(name)
    return _ADJOINT_PARTS[name]


def exact_gradients(
    key: str, reverse: bool, step_inputs: list[Tensor], previous: list[Tensor], direct: list[Tensor],
    init: list[Tensor], invariants: list[Tensor],
) -> list[Tensor]:
    """Exact BPTT's gradients of a loop (run forwards unless ``reverse``) with adjoint
    ``key``: those of its initial carries, then of its floating-point step inputs and
    invariants, from the direct gradients ``direct`` of its states ``(T, B, size)``
    (``previous``: the state each step consumed).

    One batched recomputation of the step's forward over all T steps (the per-step part of
    :func:`adjoint_parts`) gives the adjoint loop its inputs and is the linearisation of
    the VJP against the loop's inputs and weights; the adjoint loop, run against time,
    gives ``δ = g + e``, which that VJP then takes in one batched pass (one GEMM per
    weight over T·B rows)."""
    with eager_dispatch():
        received, deltas, pullback = _adjoint(key, reverse, step_inputs, previous, direct, init, invariants)
        x_grads, w_grads = pullback(tuple(deltas))
        first = -1 if reverse else 0  # the step that consumed the initial carries
        return [*(e[first] for e in received), *x_grads, *w_grads]


def exact_deltas(
    key: str, reverse: bool, step_inputs: list[Tensor], previous: list[Tensor], direct: list[Tensor],
    init: list[Tensor], invariants: list[Tensor],
) -> list[Tensor]:
    """Exact BPTT's state gradients ``δ`` of a loop, one ``(T, B, size)`` per carry (see
    :func:`exact_gradients`)."""
    with eager_dispatch():
        return _adjoint(key, reverse, step_inputs, previous, direct, init, invariants)[1]


def _adjoint(key, reverse, step_inputs, previous, direct, init, invariants):
    """The adjoint loop's received gradients ``e``, ``δ = g + e`` and the pullback of the
    VJP against the loop's inputs and weights, on one recomputation of the forward."""
    loop_inputs = [*step_inputs, *previous, *direct]
    zeros = [torch.zeros_like(c) for c in init]  # e after the last step
    parts = adjoint_parts(key, loop_inputs, zeros, invariants)
    x_slots, w_slots = differentiable(step_inputs), differentiable(invariants)
    n_x = len(step_inputs)
    in_dims = (0,) * len(loop_inputs) + (None,) * len(invariants)

    def forward(xs: tuple[Tensor, ...], ws: tuple[Tensor, ...]):
        xs_all, ws_all = filled(step_inputs, x_slots, xs), filled(invariants, w_slots, ws)
        if parts.pre is None:
            hoisted = tuple(loop_inputs)
        else:
            hoisted = tuple(torch.func.vmap(parts.pre, in_dims=in_dims)(*xs_all, *previous, *direct, *ws_all))
        if parts.state_slots is not None:
            states = tuple(hoisted[i] for i in parts.state_slots)
        else:
            body_dims = (0,) * (n_x + len(previous)) + (None,) * len(ws_all)
            states = tuple(torch.func.vmap(_ADJOINTS[key][0], in_dims=body_dims)(*xs_all, *previous, *ws_all))
        return states, tuple(h.detach() for h in hoisted)

    primals = (tuple(step_inputs[i] for i in x_slots), tuple(invariants[i] for i in w_slots))
    _, pullback, hoisted = torch.func.vjp(forward, *primals, has_aux=True)
    received = run_kernel(parts.name, not reverse, list(hoisted), zeros, invariants)
    deltas = [g + to_receiver(e, reverse) for g, e in zip(direct, received)]
    return received, deltas, pullback
