"""Analysis: the diagonal "highway" path of a step body, for Highway-BP (DESIGN.md §7).

A gated cell writes each new carry as ``a ⊙ s + b(...)`` of its old value ``s``: a GRU's
``h' = n + z ⊙ (h − n)`` (``a = z``), an LSTM's ``c' = f ⊙ c + i ⊙ g`` (``a = f``), a
padding mask's ``where(m, h_new, h)``.  Highway-BP splits every step's Jacobian into that
diagonal ``K = diag(a)`` and the rest.  Here ``K`` is found in the graph, not assumed
from the cell's name: the path is the chain of elementwise ops, each linear in the
operand that comes from the carry, leading from the carry's placeholder to its own new
value.  Every other value (the gates, ``n``, whatever reads the state through a matmul
or a nonlinearity) is held constant: ``K`` is the derivative of the carry's new value
along that chain alone.  :class:`HighwayStep` runs the step and carries that derivative
along the path op by op (each op's rule in ``_derivative``), so ``K`` costs a few
elementwise ops beside the step it comes with, not another evaluation of the step.

A path from one carry into another (an LSTM's ``c`` into ``h``) is not on the diagonal of
the concatenated state and does not count.  A carry with no path has ``K = 0``.

Why the path's K is a diagonal, element i of the old carry to element i of the new: the
path's ops are elementwise (an operand broadcast into a result never has fewer elements)
or reshapes that keep the elements' order (``view``, ``reshape``, ``squeeze``, ...: as
many elements), and it starts and ends at the carry's shape, so every value on it has as
many elements as the carry, in the carry's order (broadcasting adds only leading ones).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx

if TYPE_CHECKING:
    from ..loop_ir import LoopIR

_RESHAPES = (torch.reshape, "reshape", "view", "view_as", torch.flatten, "flatten", torch.squeeze, "squeeze",
             torch.unsqueeze, "unsqueeze")
# elementwise ops linear in the operand positions listed (None: in every tensor operand)
_LINEAR_IN: dict[object, tuple[int, ...] | None] = {
    operator.add: None, torch.add: None, "add": None,
    operator.sub: None, torch.sub: None, "sub": None,
    operator.mul: None, torch.mul: None, "mul": None,
    operator.truediv: (0,), torch.div: (0,), "div": (0,),
    operator.neg: None, torch.neg: None, "neg": None, operator.pos: None,
    torch.where: (1, 2), "where": (0, 2),
    torch.addcmul: None, "addcmul": None,
    torch.lerp: (0, 1), "lerp": (0, 1),
    torch.clone: None, "clone": None, "contiguous": (0,),
    "to": (0,), "float": (0,), "double": (0,), "type_as": (0,),
    # shape changes that keep the elements' order (a QRNN step's ``(...).view(B, H)``)
    **dict.fromkeys(_RESHAPES, (0,)),
}


def _operand_positions(node: torch.fx.Node) -> list[tuple[int, torch.fx.Node]]:
    return [(i, a) for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node)] + [
        (-1, a) for a in node.kwargs.values() if isinstance(a, torch.fx.Node)
    ]


def highway_path(body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int, carry: int) -> set[torch.fx.Node]:
    """The nodes of ``body`` that carry ``carry``'s value along its diagonal path (those
    that reach its new value; the placeholder included), or an empty set if none does."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    start = placeholders[num_step_inputs + carry]
    on_path = {start}
    for node in body.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in _LINEAR_IN:
            continue
        if node.kwargs.get("rounding_mode") is not None:  # a floor or trunc division is not linear
            continue
        allowed = _LINEAR_IN[node.target]
        # on the path if a path operand enters it linearly (not as a denominator or a mask)
        positions = [p for p, o in _operand_positions(node) if o in on_path]
        if positions and (allowed is None or all(p in allowed for p in positions)):
            on_path.add(node)
    output = next(n for n in body.graph.nodes if n.op == "output")
    new_value = output.args[0][carry]
    if new_value not in on_path:
        return set()
    reaching, stack = {new_value}, [new_value]
    while stack:
        for operand in stack.pop().all_input_nodes:
            if operand in on_path and operand not in reaching:
                reaching.add(operand)
                stack.append(operand)
    return reaching


def _derivative(target, args: tuple, kwargs: dict, d: tuple, dk: dict, out):
    """The derivative along the path of ``target(*args, **kwargs)``, given the operands'
    (``d``, ``dk``: None for an operand off the path, i.e. held constant)."""
    def get(i, name):
        return (args[i], d[i]) if i < len(args) else (kwargs.get(name), dk.get(name))

    def scaled(c, factor):
        return None if c is None else c * factor

    def total(*terms):
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    name = name.strip("_")
    if name in ("add", "sub"):
        (_, da), (_, db) = get(0, "input"), get(1, "other")
        alpha = kwargs.get("alpha", 1)
        return total(da, scaled(db, alpha if name == "add" else -alpha))
    if name == "mul":
        (a, da), (b, db) = get(0, "input"), get(1, "other")
        return total(scaled(da, b), scaled(db, a))
    if name in ("truediv", "div"):
        (_, da), (b, _) = get(0, "input"), get(1, "other")
        return scaled(da, 1 / b)
    if name == "neg":
        return scaled(get(0, "input")[1], -1)
    if name == "where":
        if isinstance(target, str):  # self.where(condition, other)
            (_, dself), (cond, _), (_, dother) = get(0, "self"), get(1, "condition"), get(2, "other")
        else:
            (cond, _), (_, dself), (_, dother) = get(0, "condition"), get(1, "input"), get(2, "other")
        zero = torch.zeros_like(out)
        return torch.where(cond, zero if dself is None else dself, zero if dother is None else dother)
    if name == "addcmul":
        (_, dx), (t1, d1), (t2, d2) = get(0, "input"), get(1, "tensor1"), get(2, "tensor2")
        return total(dx, scaled(total(scaled(d1, t2), scaled(d2, t1)), kwargs.get("value", 1)))
    if name == "lerp":
        (_, dstart), (_, dend), (weight, _) = get(0, "input"), get(1, "end"), get(2, "weight")
        return total(scaled(dstart, 1 - weight), scaled(dend, weight))
    # pos, clone, contiguous, to, float, double, type_as: the value passes unchanged; a
    # reshape keeps the order of the elements, and so of their derivatives
    first = d[0] if d else None
    return None if first is None else first.to(out.dtype).reshape(out.shape)


class NoHighwayPath(ValueError):
    """The loop's step has no residual path on any carry."""


def highway_step_of(loop: LoopIR) -> HighwayStep:
    """``loop``'s step run with each carry's highway coefficient beside it; raises
    :class:`NoHighwayPath` when no carry has a residual path."""
    step = HighwayStep(loop.body, loop.num_step_inputs, len(loop.carry_sizes))
    if not any(step.paths):
        raise NoHighwayPath(f"loop {loop.name}: its step has no residual path (a ⊙ carry + b) on any carry, "
                            "so it has no highway diagonal")
    return step


class HighwayStep(torch.fx.Interpreter):
    """Runs a step body and, beside it, each carry's highway coefficient ``K`` (the
    derivative of its new value in its old one along its path; ones at the carry, the
    ops' rules on the way).  ``run(...)`` returns ``(new carries, K per carry)``, K None
    for a carry without a path."""

    def __init__(self, body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int) -> None:
        super().__init__(body)
        self.paths = [highway_path(body, num_step_inputs, num_carries, i) for i in range(num_carries)]
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        self.carries = placeholders[num_step_inputs : num_step_inputs + num_carries]

    def run(self, *args):
        self.derivatives: list[dict[torch.fx.Node, torch.Tensor]] = [{} for _ in self.paths]
        outputs = super().run(*args)
        new_values = next(n for n in self.graph.nodes if n.op == "output").args[0]
        return outputs, [derivative.get(new) if path else None
                         for new, path, derivative in zip(new_values, self.paths, self.derivatives)]

    def run_node(self, node: torch.fx.Node):
        out = super().run_node(node)
        for carry, path, derivative in zip(self.carries, self.paths, self.derivatives):
            if node is carry and path:
                derivative[node] = torch.ones_like(out)
            elif node in path and node is not carry:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                d = tuple(derivative.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args)
                dk = {k: derivative.get(a) if isinstance(a, torch.fx.Node) else None for k, a in node.kwargs.items()}
                found = _derivative(node.target, args, kwargs, d, dk, out)
                # an operand broadcast into a larger result (``c + (1 - f) * h`` with ``h``
                # of shape (B, H), ``c`` (1, B, H)): the same derivative at every copy
                derivative[node] = found if found is None or found.shape == out.shape else found.expand(out.shape)
        return out
