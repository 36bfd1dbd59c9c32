"""Rewrite: replace a fused recurrent op by its loops, each run through :func:`run_loop`.

The replacement keeps the op's signature and outputs, so downstream nodes are untouched,
and applies inter-layer dropout itself: torch's own decomposition of these ops silently
drops it (DESIGN.md §6), which in exact mode would change what the model trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import LoopPlan, run_loop
from .find_rnn_ops import RecurrentOpSite


def make_site_runner(site: RecurrentOpSite, plans: list[LoopPlan]):
    """A function with ``torch.<kind>``'s signature computing it loop by loop."""
    directions = 2 if site.bidirectional else 1
    per_loop = site.weights_per_loop

    def runner(x: Tensor, hx, params, *_static):
        if site.batch_first:
            x = x.transpose(0, 1)
        carries0 = list(hx) if site.kind == "lstm" else [hx]
        finals: list[list[Tensor]] = []
        for layer in range(site.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                loop = site.loops[index]
                weights = list(params[index * per_loop : (index + 1) * per_loop])
                init = [c[index] for c in carries0]
                states = run_loop(loop, plans[index], [x], init, weights)
                outputs.append(states[0])
                finals.append([s[0] if loop.reverse else s[-1] for s in states])
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if site.train and site.dropout > 0 and layer < site.num_layers - 1:
                x = F.dropout(x, site.dropout, training=True)
        if site.batch_first:
            x = x.transpose(0, 1)
        return (x, *(torch.stack([f[i] for f in finals]) for i in range(len(carries0))))

    runner.__name__ = runner.__qualname__ = f"dsf_{site.kind}_{plans[0].name}"
    return runner


def rewrite_recurrent_op(gm: torch.fx.GraphModule, site: RecurrentOpSite, plans: list[LoopPlan]) -> None:
    """Point ``site``'s node at the loop-by-loop runner."""
    site.node.target = make_site_runner(site, plans)
    gm.recompile()
