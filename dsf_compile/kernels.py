"""Whole-sequence forward kernels: every state of a loop, computed eagerly.

A loop's ``forward_kernel`` is either the name of a cell of :mod:`dsf_compile.cells`
(cuDNN-backed for nn.RNN/GRU/LSTM) or the key of a registered step body, run as a plain
loop.  Kernels are asked for values (and, in exact mode, differentiated by autograd
inside ``dsf::loop_states_backward``); the rewrites supply DSF gradients themselves.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .cells import STEPS, run_cell_layer

_BODIES: dict[str, torch.fx.GraphModule] = {}


def register_body(body: torch.fx.GraphModule) -> str:
    """A kernel name for a step body.  Content-addressed: the same body gets the same
    name in every process, so graphs cached by Inductor stay valid."""
    key = "body:" + hashlib.sha1(body.code.encode()).hexdigest()[:16]
    _BODIES.setdefault(key, body)
    return key


def _run_body(body, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor]) -> list[Tensor]:
    states: list[list[Tensor]] = [[] for _ in carries]
    for t in range(x_steps[0].shape[0]):
        carries = list(body(*(x[t] for x in x_steps), *carries, *invariants))
        for seq, c in zip(states, carries):
            seq.append(c)
    return [torch.stack(seq) for seq in states]


def run_kernel(
    kernel: str, reverse: bool, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]
) -> list[Tensor]:
    """Every state ``(T, B, size)`` of a loop; ``reverse`` runs from t = T to 1."""
    if reverse:
        step_inputs = [x.flip(0) for x in step_inputs]
    if kernel in STEPS:
        (x,) = step_inputs
        states = run_cell_layer(kernel, x, carries, invariants)
    elif kernel in _BODIES:
        states = _run_body(_BODIES[kernel], step_inputs, carries, invariants)
    else:
        raise KeyError(f"unknown loop kernel {kernel!r} (a step body must be registered in this process)")
    return [s.flip(0) for s in states] if reverse else states
