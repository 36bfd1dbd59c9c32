"""Analysis: the diagonal "highway" path of a step body, for Highway-BP (DESIGN.md §7).

A gated cell writes each new carry as ``a ⊙ s + b(...)`` of its old value ``s``: a GRU's
``h' = n + z ⊙ (h − n)`` (``a = z``), an LSTM's ``c' = f ⊙ c + i ⊙ g`` (``a = f``), a
padding mask's ``where(m, h_new, h)``.  Highway-BP splits every step's Jacobian into that
diagonal ``K = diag(a)`` and the rest.  Here ``K`` is found in the graph, not assumed
from the cell's name: the path is the chain of elementwise ops, each linear in the
operand that comes from the carry, leading from the carry's placeholder to its own new
value.  Every other value (the gates, ``n``, whatever reads the state through a matmul
or a nonlinearity) is held constant: ``K`` is the derivative of the carry's new value
along that chain alone, taken by one forward-mode product with a tangent of ones.

A path from one carry into another (an LSTM's ``c`` into ``h``) is not on the diagonal of
the concatenated state and does not count.  A carry with no path has ``K = 0``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

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


def highway_carries(body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int) -> list[bool]:
    """For each carry, whether it has a diagonal path to its own new value."""
    return [bool(highway_path(body, num_step_inputs, num_carries, i)) for i in range(num_carries)]


def highway_body(
    body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int, carry: int
) -> torch.fx.GraphModule:
    """``body`` with every value that feeds ``carry``'s path from outside it detached: its
    forward-mode derivative in that carry is then ``K`` on the carry's own output."""
    path = highway_path(body, num_step_inputs, num_carries, carry)
    graph = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    detached: dict[torch.fx.Node, torch.fx.Node] = {}

    def operand(node: torch.fx.Node, user: torch.fx.Node) -> torch.fx.Node:
        if user not in path or node in path:
            return values[node]
        if node not in detached:
            detached[node] = graph.call_method("detach", (values[node],))
        return detached[node]

    for node in body.graph.nodes:
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], lambda n: values[n]))
            continue
        values[node] = graph.node_copy(node, lambda n, user=node: operand(n, user))
    return torch.fx.GraphModule(body, graph)
