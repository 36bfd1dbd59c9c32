"""Front end for what the rewrites cannot reach: loops inside higher-order ops' subgraphs.

Dynamo puts the body of ``torch.utils.checkpoint`` (``tag_activation_checkpoint``),
``wrap`` and similar higher-order ops into a subgraph that the call passes as an
argument.  The other front ends look at the top-level graph only, so a recurrent op or a
Python loop inside such a subgraph trains exactly; this pass finds them there, however
deep, and reports them as left exact with that reason.  (``scan``'s subgraph is its step,
which :mod:`find_scan_loops` handles.)
"""

from __future__ import annotations

import torch
import torch.fx

from ..loop_ir import LeftExact
from .find_python_loops import find_python_loops
from .find_rnn_ops import find_recurrent_ops
from .find_scan_loops import _is_scan


def _subgraphs(gm: torch.fx.GraphModule):
    """(higher-order op node, subgraph module) for every subgraph a call takes."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_scan(node):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                sub = getattr(gm, arg.target, None)
                if isinstance(sub, torch.fx.GraphModule):
                    yield node, sub


def find_nested_loops(gm: torch.fx.GraphModule) -> list[LeftExact]:
    """Every loop inside a subgraph of ``gm``, as left exact."""
    left = []
    for node, sub in _subgraphs(gm):
        op = getattr(node.target, "__name__", str(node.target))
        where = f"inside {op}" + (" (torch.utils.checkpoint)" if "checkpoint" in op else "")
        reason = (f"{where}: loops in a higher-order op's subgraph are not rewritten; run the recurrence "
                  "outside it for the rewrite")
        sites, exact = find_recurrent_ops(sub)
        loops, exact_loops = find_python_loops(sub)
        found = [(loop.name, loop.source) for site in sites for loop in site.loops]
        found += [(found_loop.loop.name, found_loop.loop.source) for found_loop in loops]
        left += [LeftExact(name, source, reason) for name, source in found]
        left += [LeftExact(e.what, e.source, f"{where}; also: {e.reason}") for e in exact + exact_loops]
        left += [LeftExact(e.what, e.source, f"{where}: {e.reason}") for e in find_nested_loops(sub)]
    return left
