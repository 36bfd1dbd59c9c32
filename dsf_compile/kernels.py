"""Whole-sequence forward kernels: every state of a loop, computed eagerly.

A loop's ``forward_kernel`` is either the name of a cell of :mod:`dsf_compile.cells`
(cuDNN-backed for nn.RNN/GRU/LSTM) or the key of a registered step body, run as a plain
loop.  Kernels are asked for values (and, in exact mode, differentiated by autograd
inside ``dsf::loop_states_backward``); the rewrites supply DSF gradients themselves.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import Tensor

from .cells import STEPS, run_cell_layer
from .loop_ir import LoopIR
from .passes.hoist_step_inputs import HoistedBody, hoist_step_inputs

_BODIES: dict[str, HoistedBody] = {}
# The dispatcher state of ordinary eager code, read when this module is imported.
_EAGER_INCLUDE = torch._C._dispatch_tls_local_include_set()
_EAGER_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()


@contextlib.contextmanager
def eager_dispatch(grad: bool = False):
    """Run code inside a custom op's implementation as ordinary eager code.

    An op's kernel runs with the dispatch keys above the backend excluded (autograd,
    functorch's vmap, ...); an implementation that differentiates (exact BPTT's
    recomputation) or vmaps (hoisting) needs them back.
    """
    with torch._C._ForceDispatchKeyGuard(_EAGER_INCLUDE, _EAGER_EXCLUDE), torch.set_grad_enabled(grad):
        yield


def register_body(loop: LoopIR) -> str:
    """A kernel name for ``loop``'s step body.  Content-addressed: the same body gets the
    same name in every process, so graphs cached by Inductor stay valid."""
    signature = f"{loop.body.code}|{loop.num_step_inputs}|{len(loop.carry_sizes)}"
    key = "body:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(loop.body, loop.num_step_inputs, len(loop.carry_sizes))
    return key


def _run_body(body: HoistedBody, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor]):
    """A plain loop over the recurrent part of the step, the rest done for all T at once."""
    if body.pre is not None:
        in_dims = (0,) * len(x_steps) + (None,) * len(invariants)
        with eager_dispatch(grad=torch.is_grad_enabled()):
            x_steps = list(torch.func.vmap(body.pre, in_dims=in_dims)(*x_steps, *invariants))
    states: list[list[Tensor]] = [[] for _ in carries]
    for t in range(x_steps[0].shape[0]):
        carries = list(body.rest(*(x[t] for x in x_steps), *carries, *invariants))
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
