"""nn.RNN/GRU/LSTM as one opaque op while Dynamo traces an applied model.

torch's fused RNN ops (``torch.gru`` & co.) are CompositeImplicitAutograd: when Dynamo
runs one on fake tensors to learn its outputs' shapes, the decomposition steps through
time, which makes the sequence length a constant of the graph (every new T compiled new
graphs, nn.GRU included).  While an applied model is traced (:func:`opaque_rnn_calls`),
the modules call ``dsf::fused_rnn`` instead, whose shape function reads T without
stepping, so T is a size like any other and Dynamo's automatic dynamic shapes serve every
length from the second one on.  The backend turns each such call back into torch's own
(:func:`restore_torch_calls`) before it looks for loops, so every pass sees one form.
Outside tracing, and for calls this op does not cover (packed sequences, ``proj_size``,
a single step), the modules call torch's op as always.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx
import torch.nn.modules.rnn as torch_rnn
from torch import Tensor

from .passes.find_rnn_ops import weight_count

KINDS = ("rnn_tanh", "rnn_relu", "gru", "lstm")


@torch.library.custom_op("dsf::fused_rnn", mutates_args=())
def fused_rnn(
    kind: str, x: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int,
    dropout: float, train: bool, bidirectional: bool, batch_first: bool,
) -> list[Tensor]:
    """``torch.<kind>`` on a padded batch: ``[output, h_n]`` (``[output, h_n, c_n]`` for an
    LSTM).  Only ever traced: :func:`restore_torch_calls` puts torch's op back in every
    graph before it runs."""
    state = tuple(hx) if kind == "lstm" else hx[0]
    outputs = getattr(torch, kind)(x, state, params, has_biases, num_layers, dropout, train, bidirectional,
                                   batch_first)
    return [t.clone() for t in outputs]


@fused_rnn.register_fake
def _(kind, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    hidden = params[1].shape[1]  # weight_hh_l0: (gates · hidden, hidden)
    output = x.new_empty((*x.shape[:-1], (2 if bidirectional else 1) * hidden))
    return [output, *(h.new_empty(h.shape) for h in hx)]


def _covered(kind: str, args: tuple) -> bool:
    """The padded call form with one weight set per (layer, direction), more than one step."""
    if len(args) != 9:
        return False
    x, hx, params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    if not (isinstance(x, Tensor) and x.dim() == 3 and isinstance(params, (list, tuple))):
        return False
    states = hx if kind == "lstm" else (hx,)
    if not all(isinstance(h, Tensor) for h in states) or len(states) != (2 if kind == "lstm" else 1):
        return False
    return (len(params) == weight_count(has_biases, num_layers, bidirectional)
            and x.shape[1 if batch_first else 0] != 1)


class _TracedFunctions:
    """Stands in for ``torch._VF`` in torch's RNN module code while a model is traced.
    One instance for the process: Dynamo guards on the object it reads."""

    def __init__(self, functions) -> None:
        self._functions = functions

    def __getattr__(self, name: str):
        return getattr(self._functions, name)

    def _call(self, kind: str, args: tuple):
        if not torch.compiler.is_compiling() or not _covered(kind, args):
            return getattr(self._functions, kind)(*args)
        x, hx, params, *rest = args
        outputs = fused_rnn(kind, x, list(hx) if kind == "lstm" else [hx], list(params), *rest)
        return outputs[0], *outputs[1:]

    def rnn_tanh(self, *args):
        return self._call("rnn_tanh", args)

    def rnn_relu(self, *args):
        return self._call("rnn_relu", args)

    def gru(self, *args):
        return self._call("gru", args)

    def lstm(self, *args):
        return self._call("lstm", args)


_TRACED = _TracedFunctions(torch_rnn._VF)


@contextlib.contextmanager
def opaque_rnn_calls():
    """While the block runs, nn.RNN/GRU/LSTM traced by Dynamo call ``dsf::fused_rnn``."""
    functions = torch_rnn._VF
    torch_rnn._VF = _TRACED
    try:
        yield
    finally:
        torch_rnn._VF = functions


def restore_torch_calls(gm: torch.fx.GraphModule) -> None:
    """Turn every ``dsf::fused_rnn`` call in ``gm`` (and in its subgraphs) back into the
    ``torch.<kind>`` call it stands for; its outputs are used the same way."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.dsf.fused_rnn.default:
                kind, x, hx, params, *rest = node.args
                node.target = getattr(torch, kind)
                node.args = (x, tuple(hx) if kind == "lstm" else hx[0], params, *rest)
                changed = True
        if changed:
            module.recompile()
