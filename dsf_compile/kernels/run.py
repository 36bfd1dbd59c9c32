"""Which kernel runs a loop's forward: torch's fused cell op, or a registered step body
on the device's rolled loop."""

from __future__ import annotations

from torch import Tensor

from ..cells import STEPS, run_cell_layer
from .cpu import stepped_states, written_states
from .cuda import graphed_loop
from .registry import _BODIES, _COMPILED_ON_CPU, cell_body


def _run_body(
    key: str, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor], reverse: bool
) -> list[Tensor]:
    """Every state of a registered body.  On CUDA one CUDA graph replay of the whole loop
    over the Inductor-compiled step; on a CPU a loop of the step, compiled by Inductor
    for the bodies registered so (:func:`written_states`), else run op by op."""
    if x_steps[0].is_cuda:
        return graphed_loop(key, x_steps, carries, invariants, reverse)
    if key in _COMPILED_ON_CPU:
        return written_states(key, x_steps, carries, invariants, reverse)
    body = _BODIES[key]
    return stepped_states(body, body.rest, x_steps, carries, invariants, reverse)


def run_kernel(
    kernel: str, reverse: bool, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]
) -> list[Tensor]:
    """Every state ``(T, B, size)`` of a loop; ``reverse`` runs from t = T to 1."""
    if kernel in STEPS:
        (x,) = step_inputs
        if x.is_cuda:
            # The cell's step compiled and replayed as one CUDA graph.  cuDNN's
            # RNN call costs about 10 ms of host time on an H100 machine (torch 2.11), more
            # than its device time, so the device sat idle; the graph has no host work per
            # step (experiments/results/bench-*.md).
            return graphed_loop(cell_body(kernel, len(invariants) == 4), [x], carries, invariants, reverse)
        states = run_cell_layer(kernel, x.flip(0) if reverse else x, carries, invariants)
        return [s.flip(0) for s in states] if reverse else states
    if kernel in _BODIES:
        return _run_body(kernel, step_inputs, carries, invariants, reverse)
    raise KeyError(f"unknown loop kernel {kernel!r} (a step body must be registered in this process)")
