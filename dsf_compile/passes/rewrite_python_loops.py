"""Rewrite: replace the T unrolled copies of a re-rolled Python loop by one node.

The node runs the loop through :func:`run_loop` (a rolled forward over the registered
step body, the batched body and the feedback node for the gradient), then computes the
per-step outputs that are not carried (a per-step head, say) for all steps at once from
the states.  Uses of step t's values become slices of the results; ``torch.stack`` of
all of them becomes the result itself, so no O(T) node lists remain.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import Tensor

from ..loop_ir import LoopIR
from ..runtime import LoopPlan, previous_states, run_loop
from .find_python_loops import PythonLoop, StepInputFamily


def make_loop_runner(loop: LoopIR, epilogue: torch.fx.GraphModule | None, plan: LoopPlan):
    """``runner(step_inputs, init, invariants, epilogue_invariants)`` → the states of
    every carry, then the epilogue's per-step outputs, all ``(T, ...)`` in time order."""

    def runner(step_inputs: list[Tensor], init: list[Tensor], invariants: list[Tensor], extra: list[Tensor]):
        states = run_loop(loop, plan, list(step_inputs), list(init), list(invariants))
        if epilogue is None:
            return tuple(states)
        previous = [previous_states(s, c, loop.reverse) for s, c in zip(states, init)]
        batched = (0,) * (len(step_inputs) + 2 * len(states)) + (None,) * len(extra)
        outputs = torch.func.vmap(epilogue, in_dims=batched)(*step_inputs, *previous, *states, *extra)
        return (*states, *outputs)

    runner.__name__ = runner.__qualname__ = f"dsf_python_loop_{plan.name}"
    return runner


def _stack_step_input(graph: torch.fx.Graph, family: StepInputFamily, indices: list[int]) -> torch.fx.Node:
    """The family's slices for ``indices`` as one ``(T, ...)`` tensor in time order."""
    ordered = sorted(indices)
    low, length = ordered[0], len(ordered)
    contiguous = ordered == list(range(low, low + length)) and low >= 0
    source = family.source
    kept_axis = family.kept_time_axis() if _splits_into_single_steps(source) else None
    if family.kind == "sequence" and source.target in ("unbind", torch.unbind) and contiguous:
        tensor, dim = source.args[0], family.dim
    elif kept_axis is not None and contiguous:
        tensor, dim = source.args[0], family.dim
    elif family.kind in ("index", "select") and contiguous:
        tensor, dim = source, family.dim
    else:
        return graph.call_function(torch.stack, ([family.members[i] for i in ordered],))
    moved = graph.call_function(torch.movedim, (tensor, dim, 0))
    steps = graph.call_function(torch.narrow, (moved, 0, low, length))
    if kept_axis is not None:
        return graph.call_function(torch.unsqueeze, (steps, kept_axis + 1))
    if family.after:
        return graph.call_function(operator.getitem, (steps, (slice(None), *family.after)))
    return steps


def _splits_into_single_steps(node: torch.fx.Node) -> bool:
    """``x.split(1, d)`` / ``torch.split(x, 1, d)``: pieces of one step each."""
    if node.target not in ("split", torch.split):
        return False
    size = node.kwargs.get("split_size", node.kwargs.get("split_size_or_sections",
                                                         node.args[1] if len(node.args) > 1 else None))
    return size == 1


def rewrite_python_loop(gm: torch.fx.GraphModule, found: PythonLoop, plan: LoopPlan) -> None:
    graph = gm.graph
    loop = found.loop
    inside = {node for seg in found.segments for node in seg} | set(found.pieces)
    steps = len(found.segments)
    with graph.inserting_before(found.segments[-1][-1].next):
        stacked = [_stack_step_input(graph, family, indices) for family, indices in found.step_inputs]
        runner = graph.call_function(
            make_loop_runner(loop, found.epilogue, plan),
            (stacked, list(found.init), list(found.invariants), list(found.epilogue_invariants)),
        )
        results = [
            graph.call_function(operator.getitem, (runner, slot))
            for slot in range(len(found.carry_positions) + len(found.epilogue_positions))
        ]
    positions = found.carry_positions + found.epilogue_positions
    for slot, k in enumerate(positions):
        per_step = [seg[k] for seg in found.segments]
        in_time_order = per_step[::-1] if loop.reverse else per_step
        for user in {u for node in per_step for u in node.users if u not in inside}:
            if _is_stack_of(user, in_time_order):
                dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
                with graph.inserting_before(user):
                    replacement = graph.call_function(torch.movedim, (results[slot], 0, dim))
                _same_value(replacement, user)
                user.replace_all_uses_with(replacement)
                graph.erase_node(user)
                continue
            for t, node in enumerate(per_step):
                if node in user.all_input_nodes:
                    time = steps - 1 - t if loop.reverse else t
                    with graph.inserting_before(user):
                        step_value = graph.call_function(operator.getitem, (results[slot], time))
                    _same_value(step_value, node)
                    user.replace_input_with(node, step_value)
    for node in reversed([n for n in graph.nodes if n in inside]):
        graph.erase_node(node)
    for family, _ in found.step_inputs:
        for member in family.members.values():
            if not member.users:
                graph.erase_node(member)
    graph.lint()
    gm.recompile()


def _same_value(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Carry Dynamo's metadata over to a node computing the same value, so that later
    passes (the next loop's front end) can read its shape."""
    for key in ("example_value", "stack_trace", "nn_module_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _is_stack_of(user: torch.fx.Node, nodes: list[torch.fx.Node]) -> bool:
    return (
        user.op == "call_function"
        and user.target is torch.stack
        and len(user.args) >= 1
        and isinstance(user.args[0], (list, tuple))
        and list(user.args[0]) == nodes
    )


def rewrite_scan_loop(gm: torch.fx.GraphModule, found, plan: LoopPlan) -> None:
    """Replace a ``scan`` op by the same runner; its outputs keep the op's layout
    (final carries, then the stacked per-step outputs)."""
    loop = found.loop
    runner = make_loop_runner(loop, found.epilogue, plan)
    layout = found.outputs
    n_carries = len(loop.carry_sizes)

    def scan_runner(step_inputs, init, invariants, extra):
        results = runner(step_inputs, init, invariants, extra)
        states, epilogue = results[:n_carries], results[n_carries:]
        picked = {"final": lambda j: states[j][-1], "states": lambda j: states[j], "epilogue": lambda m: epilogue[m]}
        return [picked[kind](index) for kind, index in layout]

    scan_runner.__name__ = scan_runner.__qualname__ = f"dsf_scan_{plan.name}"
    node = found.node
    combine = node.args[0]
    node.target = scan_runner
    node.args = (list(node.args[2]), list(node.args[1]), list(found.invariants), list(found.epilogue_invariants))
    if not combine.users:
        gm.graph.erase_node(combine)
    gm.graph.lint()
    gm.recompile()
