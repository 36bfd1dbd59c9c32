"""Split a step body into the work that reads no carry and the recurrent rest.

Everything in a step that depends on per-step inputs but on no carried value (the input
projection ``W x_t`` above all) can be done for all T steps at once, as one batched op,
before the sequential loop; the loop then only runs what really is recurrent.  This is
the hoisting cuDNN does for nn.GRU, done here for any step body.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx


@dataclass
class HoistedBody:
    """``pre(step_inputs, invariants) -> hoisted`` (batched over time by the caller) and
    ``rest(hoisted, carries, invariants) -> new carries`` (one step)."""

    pre: torch.fx.GraphModule | None
    rest: torch.fx.GraphModule


def hoist_step_inputs(body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int) -> HoistedBody:
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    step_inputs = placeholders[:num_step_inputs]
    carries = placeholders[num_step_inputs : num_step_inputs + num_carries]
    invariants = placeholders[num_step_inputs + num_carries :]
    recurrent: set[torch.fx.Node] = set(carries)
    per_step: set[torch.fx.Node] = set(step_inputs)
    for node in body.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        if any(i in recurrent for i in inputs):
            recurrent.add(node)
        elif any(i in per_step for i in inputs):
            per_step.add(node)
    # values computed before the loop that the recurrent part (or the output) reads
    output = next(n for n in body.graph.nodes if n.op == "output")
    frontier = [n for n in body.graph.nodes if n in per_step and any(u in recurrent or u is output for u in n.users)]
    if all(n in step_inputs for n in frontier):
        return HoistedBody(None, body)

    pre_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in body.graph.nodes:
        if node in step_inputs or node in invariants:
            env[node] = pre_graph.placeholder(node.name)
        elif node.op not in ("placeholder", "output") and node not in recurrent:
            env[node] = pre_graph.node_copy(node, lambda n: env[n])
    pre_graph.output(tuple(env[n] for n in frontier))
    pre_graph.eliminate_dead_code()

    rest_graph = torch.fx.Graph()
    env = {n: rest_graph.placeholder(f"hoisted_{n.name}") for n in frontier}
    for node in carries + invariants:
        env[node] = rest_graph.placeholder(node.name)
    for node in body.graph.nodes:
        if node.op not in ("placeholder", "output") and node not in per_step:
            env[node] = rest_graph.node_copy(node, lambda n: env[n])
    rest_graph.output(torch.fx.node.map_arg(output.args[0], lambda n: env[n]))
    return HoistedBody(torch.fx.GraphModule(body, pre_graph), torch.fx.GraphModule(body, rest_graph))


def step_outputs(rest: torch.fx.GraphModule) -> tuple:
    """The values a step graph returns (its new carries first)."""
    return next(n for n in rest.graph.nodes if n.op == "output").args[0]
