"""Front end: the fused recurrent ops behind nn.RNN, nn.GRU and nn.LSTM.

With Dynamo's ``allow_rnn`` on, each module call is one ``torch.rnn_tanh`` /
``torch.rnn_relu`` / ``torch.gru`` / ``torch.lstm`` node holding every layer and
direction.  Each (layer, direction) becomes one :class:`LoopIR` with the cell's step as
body, the layer input as per-step input and the layer's weights as invariants.

Left exact (and reported): packed sequences, LSTM ``proj_size``, and anything whose
arguments are not the plain padded-input form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ..cells import CARRIES, trace_step
from ..loop_ir import LeftExact, LoopIR
from .provenance import module_path, user_source

RECURRENT_OPS = {
    torch.rnn_tanh: "rnn_tanh",
    torch.rnn_relu: "rnn_relu",
    torch.gru: "gru",
    torch.lstm: "lstm",
}
MODULE_OF = {"rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN", "gru": "nn.GRU", "lstm": "nn.LSTM"}


@dataclass
class RecurrentOpSite:
    """One fused recurrent op call and the loops it consists of (layer-major)."""

    node: torch.fx.Node
    kind: str
    has_biases: bool
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool
    loops: list[LoopIR]

    @property
    def weights_per_loop(self) -> int:
        return weights_per_loop(self.has_biases)


def weights_per_loop(has_biases: bool) -> int:
    """Weights of one (layer, direction): two matrices and two biases, or just the matrices."""
    return 4 if has_biases else 2


def weight_count(has_biases: bool, num_layers: int, bidirectional: bool) -> int:
    """Length of a fused RNN op's weight list without ``proj_size``: one set per (layer,
    direction)."""
    return num_layers * (2 if bidirectional else 1) * weights_per_loop(has_biases)


def _example(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _describe(node: torch.fx.Node, kind: str) -> str:
    path = module_path(node)
    name = f"{MODULE_OF[kind]} '{path}'" if path else MODULE_OF[kind]
    return f"{name} (torch.{kind})"


def _site_or_reason(node: torch.fx.Node, kind: str) -> RecurrentOpSite | str:
    args = node.args
    if len(args) != 9 or node.kwargs:
        return "unrecognised call signature"
    if not isinstance(args[2], (list, tuple)):
        return "packed sequence input (PackedSequence) is not supported; pad the batch instead"
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    directions = 2 if bidirectional else 1
    if len(params) != weight_count(has_biases, num_layers, bidirectional):
        return "LSTM with proj_size is not supported" if kind == "lstm" else "unexpected weight list"
    example = _example(x)
    if example is None or example.dim() != 3:
        return "unbatched (2-D) input is not supported; add a batch dimension"
    length, batch = (example.shape[1], example.shape[0]) if batch_first else example.shape[:2]
    if length == 1:
        # Rewritten, its one step would only trade the gradient to its initial state (the
        # recurrence of whatever loop calls it, a decoder's) for λ times it.
        return ("a single step (T=1): nothing recurs inside it; called once per step of a loop (a decoder), "
                "that loop is the recurrence")
    hidden_example = _example(params[1])
    hidden = hidden_example.shape[1] if hidden_example is not None else None
    if hidden is None:
        return "weight shapes unknown"
    body = trace_step(kind, has_biases)
    carries = CARRIES[kind]
    what, source = _describe(node, kind), user_source(node)
    loops = []
    for layer in range(num_layers):
        for direction in range(directions):
            reverse = direction == 1
            loops.append(
                LoopIR(
                    name=f"{what} layer {layer}{' reverse' if reverse else ''}",
                    body=body,
                    carry_names=carries,
                    carry_sizes=(hidden,) * len(carries),
                    num_step_inputs=1,
                    num_invariants=weights_per_loop(has_biases),
                    reverse=reverse,
                    origin=what,
                    source=source,
                    length=length,
                    batch=batch,
                    forward_kernel=kind,
                )
            )
    return RecurrentOpSite(
        node, kind, has_biases, num_layers, float(dropout), bool(train), bool(bidirectional),
        bool(batch_first), loops,
    )


def _drops_dropout(node: torch.fx.Node) -> bool:
    """A multi-layer op with dropout, in training (padded or packed call form)."""
    if len(node.args) != 9:
        return False
    padded = isinstance(node.args[2], (list, tuple))
    num_layers, dropout, train = node.args[4:7] if padded else node.args[5:8]
    return isinstance(num_layers, int) and num_layers > 1 and bool(train) and float(dropout) > 0


def find_recurrent_ops(gm: torch.fx.GraphModule) -> tuple[list[RecurrentOpSite], list[LeftExact]]:
    """Every nn.RNN/GRU/LSTM op call in ``gm``: the ones we can rewrite, and the rest."""
    sites: list[RecurrentOpSite] = []
    left: list[LeftExact] = []
    for node in gm.graph.nodes:
        kind = RECURRENT_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        found = _site_or_reason(node, kind)
        if isinstance(found, str):
            if _drops_dropout(node):
                found += (
                    "; beware: torch's decomposition of this op silently drops its inter-layer dropout "
                    "under torch.compile"
                )
            left.append(LeftExact(_describe(node, kind), user_source(node), found))
        else:
            sites.append(found)
    return sites, left
