"""Whole-sequence forward kernels: every state of a loop at once.

A loop's ``forward_kernel`` is either the name of a cell of :mod:`dsf_compile.cells`
(nn.RNN/GRU/LSTM) or the key of a registered step body, run as a rolled loop: its
input-only part hoisted and done for all T at once, then the recurrent rest stepped T
times (on CUDA compiled by Inductor and replayed as one CUDA graph; on a CPU compiled
too where registered so, writing into the buffers of all T).  A cell runs as torch's
fused op, except on CUDA, where its step body runs as such a graphed loop: faster than
cuDNN there, whose host-side cost per call idles the device; and where the backward
reuses the step's products (:func:`register_products`), which the fused op does not
keep.  Kernels are
asked for values only; the rewrites supply every mode's gradients themselves, exact
BPTT's by the adjoint loop of :func:`register_adjoint` (:func:`exact_gradients`).
"""

from .adjoint import _ADJOINT_PARTS, AdjointParts, adjoint_parts, exact_deltas, exact_gradients
from .cpu import (
    _COMPILED_STEPS,
    _WRITING_STEPS,
    compiled_step,
    hoisted_inputs,
    passed_through,
    step_inputs_of,
    stepped_states,
    writing_step,
    written_states,
)
from .cuda import _GRAPHS, GRAPH_CACHE_SIZE, GraphedLoop, clear_graphs, graphed_loop
from .registry import (
    _ADJOINTS,
    _BODIES,
    _COMPILED_ON_CPU,
    SavedProducts,
    cell_body,
    extra_outputs,
    graph_structure,
    register_adjoint,
    register_body,
    register_products,
)
from .run import run_kernel
from .tensors import differentiable, eager_dispatch, filled, rademacher_like, to_receiver

__all__ = [
    "GRAPH_CACHE_SIZE", "AdjointParts", "GraphedLoop", "SavedProducts", "adjoint_parts", "cell_body", "clear_graphs",
    "compiled_step", "differentiable", "eager_dispatch", "exact_deltas", "exact_gradients", "extra_outputs", "filled",
    "graph_structure", "graphed_loop", "hoisted_inputs", "passed_through", "register_adjoint", "register_body",
    "rademacher_like", "register_products", "run_kernel", "step_inputs_of", "stepped_states", "to_receiver",
    "writing_step", "written_states", "_ADJOINTS", "_ADJOINT_PARTS", "_BODIES", "_COMPILED_ON_CPU",
    "_COMPILED_STEPS", "_GRAPHS", "_WRITING_STEPS",
]
