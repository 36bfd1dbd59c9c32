"""Step functions and whole-sequence kernels of the cells behind nn.RNN, nn.GRU, nn.LSTM.

A step function is what a loop's ``body`` is traced from: one time step on ``(B, ...)``
rows, written with ordinary torch ops so that ``vmap`` over time turns every weight use
into one GEMM over all T·B rows.  :func:`run_cell_layer` computes every state of a layer at once with
torch's fused RNN ops, on a CPU (on CUDA :mod:`dsf_compile.kernels`' graphed step loop is
faster).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor


def rnn_tanh_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None):
    return (torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)),)


def rnn_relu_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None):
    return (torch.relu(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)),)


def gru_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None):
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (n + z * (h - n),)


def lstm_step(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None):
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


STEPS: dict[str, Callable] = {
    "rnn_tanh": rnn_tanh_step,
    "rnn_relu": rnn_relu_step,
    "gru": gru_step,
    "lstm": lstm_step,
}
CARRIES: dict[str, tuple[str, ...]] = {
    "rnn_tanh": ("h",),
    "rnn_relu": ("h",),
    "gru": ("h",),
    "lstm": ("h", "c"),
}


def trace_step(kind: str, has_biases: bool) -> torch.fx.GraphModule:
    """The FX body of one step of ``kind``: (x, *carries, w_ih, w_hh[, b_ih, b_hh])."""
    step = STEPS[kind]
    if kind == "lstm":
        if has_biases:
            def body(x, h, c, w_ih, w_hh, b_ih, b_hh):
                return step(x, h, c, w_ih, w_hh, b_ih, b_hh)
        else:
            def body(x, h, c, w_ih, w_hh):
                return step(x, h, c, w_ih, w_hh)
    elif has_biases:
        def body(x, h, w_ih, w_hh, b_ih, b_hh):
            return step(x, h, w_ih, w_hh, b_ih, b_hh)
    else:
        def body(x, h, w_ih, w_hh):
            return step(x, h, w_ih, w_hh)
    return torch.fx.symbolic_trace(body)


def trace_masked_step(kind: str, has_biases: bool) -> torch.fx.GraphModule:
    """The FX body of one step of ``kind`` over a padded batch: (x, valid, *carries,
    *weights) -> the cell's new carries where ``valid`` (a ``(B, 1)`` bool), the old ones
    where the row's sequence has ended."""
    step = STEPS[kind]
    n_carries = len(CARRIES[kind])

    def body(x, valid, *rest):
        carries, weights = rest[:n_carries], rest[n_carries:]
        new = step(x, *carries, *weights)
        return tuple(torch.where(valid, n, c) for n, c in zip(new, carries))

    names = ["x", "valid", *CARRIES[kind], "w_ih", "w_hh", *(("b_ih", "b_hh") if has_biases else ())]
    return _trace_with_arguments(body, names)


def _trace_with_arguments(function, names: list[str]) -> torch.fx.GraphModule:
    """``function(*args)`` traced with one placeholder per name."""
    graph = torch.fx.Graph()
    placeholders = [graph.placeholder(name) for name in names]
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    outputs = function(*(torch.fx.Proxy(p, tracer) for p in placeholders))
    graph.output(tuple(o.node for o in outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def run_cell_layer(kind: str, x: Tensor, carries: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """All states of one forward-in-time layer, values only, through torch's fused RNN ops."""
    has_biases, train = len(weights) == 4, False
    if kind == "lstm":
        h0, c0 = carries
        hs = torch.lstm(x, (h0[None], c0[None]), weights, has_biases, 1, 0.0, train, False, False)[0]
        # torch.lstm does not return the cell states; they follow from the hidden states by
        # a linear recurrence with the (batched) gates as coefficients.
        h_prev = torch.cat([h0[None], hs[:-1]])
        gates = F.linear(x, weights[0], weights[2] if has_biases else None)
        gates = gates + F.linear(h_prev, weights[1], weights[3] if has_biases else None)
        i, f, g, _ = gates.chunk(4, -1)
        forget = torch.sigmoid(f)
        write = torch.sigmoid(i) * torch.tanh(g)
        cs = []
        c = c0
        for t in range(x.shape[0]):
            c = torch.addcmul(write[t], forget[t], c)
            cs.append(c)
        return [hs, torch.stack(cs)]
    op = {"gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}[kind]
    return [op(x, carries[0][None], weights, has_biases, 1, 0.0, train, False, False)[0]]


def _rnn_tanh_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return rnn_tanh_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]


def _rnn_relu_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return rnn_relu_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]


def _gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return gru_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]


def _lstm_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return lstm_step(x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)


# torch's fused cell ops have no vmap batching rule; inside a re-rolled step body they
# are replaced by the same maths in plain ops.
DECOMPOSED_CELL_OPS: dict[Callable, Callable] = {
    torch.rnn_tanh_cell: _rnn_tanh_cell,
    torch.rnn_relu_cell: _rnn_relu_cell,
    torch.gru_cell: _gru_cell,
    torch.lstm_cell: _lstm_cell,
}
