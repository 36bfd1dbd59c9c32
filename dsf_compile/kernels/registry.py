"""The registry of loop kernels: each step body (and the variants that keep its products
or run its adjoint) under a content-addressed name, so that every layer, process and
compiled graph that runs the same computation shares one entry."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

from ..cells import CARRIES, trace_step
from ..loop_ir import LoopIR
from ..step.hoist import HoistedBody, hoist_step_inputs, step_outputs
from ..step.products import find_products, forward_body, reusing_body

_BODIES: dict[str, HoistedBody] = {}


# exact BPTT's adjoint loops: the step body, its number of step inputs and of carries
_ADJOINTS: dict[str, tuple[torch.fx.GraphModule, int, int]] = {}


# kernels whose sequential step runs compiled by Inductor on a CPU too
_COMPILED_ON_CPU: set[str] = set()


def register_body(loop: LoopIR) -> str:
    """A kernel name for ``loop``'s step body.  Content-addressed: the same computation
    gets the same name in every process (graphs cached by Inductor stay valid) and in
    every layer that runs it (one compiled step and one CUDA graph serve them all),
    whatever its values are called."""
    signature = f"{graph_structure(loop.body.graph)}|{loop.num_step_inputs}|{len(loop.carry_sizes)}"
    key = "body:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(loop.body, loop.num_step_inputs, len(loop.carry_sizes))
    return key


@dataclass
class SavedProducts:
    """A loop's products with its weights, kept from the forward for the backward
    (:mod:`dsf_compile.passes.save_products`): ``kernel``, a forward kernel returning the
    loop's states and then each product at every step; ``body``, the step body reading
    them back (``count`` more per-step inputs, after its own placeholders)."""

    kernel: str
    body: torch.fx.GraphModule
    count: int


def register_products(loop: LoopIR, compile_step: bool = False) -> SavedProducts | None:
    """The kernel and the backward body that keep ``loop``'s products with its weights;
    None if its step has none.  Content-addressed like :func:`register_body`.
    ``compile_step``: the forward's sequential step runs compiled by Inductor on a CPU too
    (as it does on CUDA), which keeps it as fast as torch's fused RNN ops there."""
    counts = (loop.num_step_inputs, len(loop.carry_sizes))
    products = find_products(loop.body, *counts)
    if not products:
        return None
    signature = f"products|{graph_structure(loop.body.graph)}|{counts[0]}|{counts[1]}|{compile_step}"
    key = "products:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(forward_body(loop.body, products), *counts)
    if compile_step:
        _COMPILED_ON_CPU.add(key)
    return SavedProducts(key, reusing_body(loop.body, products), len(products))


def extra_outputs(kernel: str, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]):
    """One step's values of what kernel ``kernel`` returns beyond the states (the products
    of a :func:`register_products` kernel), computed from step 0: their shapes and dtypes,
    for the kernel's fake implementation."""
    body = _BODIES.get(kernel)
    if body is None or len(step_outputs(body.rest)) == len(carries):
        return []
    first = [x[0] for x in step_inputs]
    hoisted = first if body.pre is None else list(body.pre(*first, *invariants))
    return list(body.rest(*hoisted, *carries, *invariants))[len(carries) :]


def register_adjoint(loop: LoopIR, compile_step: bool = False) -> str:
    """A kernel name for the exact adjoint loop of ``loop`` (exact BPTT's backward), run by
    :func:`exact_gradients`.

    Its step ``t`` maps ``(x_t, s_{t-1}, g_t, e_{t+1})`` to ``e_t = J_tᵀ (g_t + e_{t+1})``,
    the gradient reaching the state step t consumed (``J_t = ∂s_t/∂s_{t-1}`` at that step's
    values; ``g`` the direct gradients of the states): run against time from
    ``e_{T+1} = 0``, ``δ_t = g_t + e_{t+1}``.  Everything in that step that does not read
    ``e`` (recomputing the gates from the saved states, their derivatives) reads only
    per-step values, so :func:`hoist_step_inputs` moves it out of the loop into a few
    batched ops over all T steps: what stays sequential is a product with the recurrent
    weights and some elementwise work per step, fewer and smaller kernels than eager
    autograd's backward walks.  Content-addressed like :func:`register_body`; the graph is
    traced for each shape it meets (:func:`adjoint_parts`).  ``compile_step``: on a CPU
    too, the sequential part runs as compiled by Inductor (as it always does on CUDA), one
    or two fused kernels and the product per step instead of a dozen small ops.
    """
    counts = (loop.num_step_inputs, len(loop.carry_sizes))
    signature = f"adjoint|{graph_structure(loop.body.graph)}|{counts[0]}|{counts[1]}|{compile_step}"
    key = "adjoint:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    _ADJOINTS.setdefault(key, (loop.body, *counts))
    if compile_step:
        _COMPILED_ON_CPU.add(key)
    return key


def graph_structure(graph: torch.fx.Graph) -> str:
    """``graph``'s operations and how they connect, without the names of its values."""
    index: dict[torch.fx.Node, int] = {}
    lines = []
    for node in graph.nodes:
        index[node] = len(index)
        if node.op == "placeholder":
            target = ""
        elif isinstance(node.target, str):
            target = node.target
        else:
            target = torch.fx.node._get_qualified_name(node.target)
        operands = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        lines.append(f"{node.op} {target} {operands}")
    return "\n".join(lines)


def cell_body(kind: str, has_biases: bool) -> str:
    """The kernel name of the step body of torch's ``kind`` cell (nn.RNN/GRU/LSTM)."""
    key = f"cell:{kind}:{'bias' if has_biases else 'no-bias'}"
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(trace_step(kind, has_biases), 1, len(CARRIES[kind]))
    return key
