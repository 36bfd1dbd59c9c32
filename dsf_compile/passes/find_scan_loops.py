"""Front end: loops written with torch's ``scan`` higher-order op.

``scan(combine_fn, init, xs, additional_inputs)`` is already a rolled loop: its combine
graph is the step, ``init`` the carries, ``xs`` the per-step inputs (time is dim 0) and
``additional_inputs`` the invariants.  The combine graph's per-step outputs ``ys`` that
are not carries become the epilogue, exactly as for re-rolled Python loops.

Rewriting it also sidesteps the op's own training path: in torch 2.11 it returns wrong
weight gradients when the initial carry does not require grad (DESIGN.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ..loop_ir import LeftExact, LoopIR
from .find_python_loops import NotALoop, _carry_shape_problem, _Check, _step_graph, random_op_problem
from .provenance import module_path, user_source


@dataclass
class ScanLoop:
    node: torch.fx.Node
    loop: LoopIR
    epilogue: torch.fx.GraphModule | None
    epilogue_invariants: list[torch.fx.Node]
    invariants: list[torch.fx.Node]
    # for each of the op's outputs: ("final", j), ("states", j) or ("epilogue", m)
    outputs: list[tuple[str, int]]


def _is_scan(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr(torch.ops.higher_order, "scan", None)


def find_scan_loops(gm: torch.fx.GraphModule) -> tuple[list[ScanLoop], list[LeftExact]]:
    found, left = [], []
    for node in gm.graph.nodes:
        if not _is_scan(node):
            continue
        try:
            found.append(_scan_loop(gm, node))
        except NotALoop as reason:
            left.append(LeftExact("torch scan", user_source(node), str(reason)))
    return found, left


def _scan_loop(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ScanLoop:
    combine_ref, init, xs, additional = node.args[:4]
    if combine_ref.op != "get_attr" or not xs:
        raise NotALoop("scan without per-step inputs" if not xs else "combine function is not a graph")
    combine: torch.fx.GraphModule = getattr(gm, combine_ref.target)
    placeholders = [n for n in combine.graph.nodes if n.op == "placeholder"]
    n_c, n_x = len(init), len(xs)
    carry_ph, x_ph = placeholders[:n_c], placeholders[n_c : n_c + n_x]
    outer = dict(zip(placeholders[n_c + n_x :], additional))
    returned = list(next(n for n in combine.graph.nodes if n.op == "output").args[0])
    first = [n for n in combine.graph.nodes if n.op in ("call_function", "call_method")]
    if any(n.op == "get_attr" for n in combine.graph.nodes):
        raise NotALoop("the step reads a constant stored in the combine graph")
    problem = random_op_problem(first)
    if problem:
        raise NotALoop(problem)
    position = {n: k for k, n in enumerate(first)}
    if any(out not in position for out in returned[:n_c]):
        raise NotALoop("a carry is passed through the step unchanged")
    carry_positions = [position[out] for out in returned[:n_c]]
    for out in returned[:n_c]:
        problem = _carry_shape_problem(out)
        if problem:
            raise NotALoop(problem)

    check = _Check()
    step_markers = list(range(n_x))
    for k, n in enumerate(first):
        leaves = torch.utils._pytree.tree_flatten((n.args, n.kwargs))[0]
        for i, leaf in enumerate(leaves):
            if leaf in carry_ph:
                check.carry_slots[k, i] = carry_positions[carry_ph.index(leaf)]
            elif leaf in x_ph:
                check.step_slots[k, i] = (step_markers[x_ph.index(leaf)], 1)

    outputs: list[tuple[str, int]] = [("final", j) for j in range(n_c)]
    epilogue_positions = []
    for y in returned[n_c:]:
        if y in returned[:n_c]:
            outputs.append(("states", returned[:n_c].index(y)))
        elif y in position:
            outputs.append(("epilogue", len(epilogue_positions)))
            epilogue_positions.append(position[y])
        else:
            raise NotALoop("a per-step output is an input of the step, not computed by it")

    body, body_invariants = _step_graph(first, check, carry_positions, carry_positions, step_markers, False, {})
    epilogue, epilogue_invariants = None, []
    if epilogue_positions:
        epilogue, epilogue_invariants = _step_graph(
            first, check, epilogue_positions, carry_positions, step_markers, True, {}
        )
    example = node.args[2][0].meta.get("example_value")
    path = module_path(node)
    what = f"torch scan{' in ' + repr(path) if path else ''}"
    loop = LoopIR(
        name=f"{what} at {user_source(node)}",
        body=body,
        carry_names=tuple(n.name for n in returned[:n_c]),
        carry_sizes=tuple(int(n.meta["example_value"].shape[1]) for n in returned[:n_c]),
        num_step_inputs=n_x,
        num_invariants=len(body_invariants),
        reverse=False,
        origin=what,
        source=user_source(node),
        length=None if example is None else example.shape[0],
        batch=returned[0].meta["example_value"].shape[0],
    )
    return ScanLoop(
        node=node,
        loop=loop,
        epilogue=epilogue,
        epilogue_invariants=[outer[p] for p in epilogue_invariants],
        invariants=[outer[p] for p in body_invariants],
        outputs=outputs,
    )
