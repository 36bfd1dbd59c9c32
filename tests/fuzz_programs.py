"""Random hand-written recurrent programs, and the invariant every one of them must keep.

A :class:`Program` is one choice of cell (tanh RNN, GRU, LSTM, gated residual, layer-norm
RNN), of how the loop reads its inputs (``x[:, t]``, ``x[t]``, ``unbind``, ``select``,
``split``, ``x[:, t:t+1]``, ``narrow``), direction, padding mask, embedding looked up
inside the loop, in-place writes, a (features, batch) state, an initial state shaped
``(1, B, H)`` that each step ``view``s back to ``(B, H)`` (as a QRNN's CPU loop does), what the loop returns
(every state, a per-step head, the last state) and of sizes.  :func:`make_model` writes
it as an ``nn.Module`` whose ``forward`` is a Python loop over ``self.step``, the way
people write RNNs by hand.

:func:`check_invariant` applies ``dsf_compile`` and checks, in float64:

1. the forward equals eager's;
2. a loop that was rewritten has the mode's gradients (DSF/FT against the literal
   per-step reference, ``bptt`` against eager autograd); a loop that was not is listed
   as left exact and trains with eager's gradients;
3. programs that must not be rewritten (in-place writes, a (features, batch) state)
   are not.

It returns what happened, for the counts of a long run.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import dsf_compile

from .helpers import rel_err
from .reference import dsf_reference_loop

CELLS = ("tanh", "gru", "lstm", "gated residual", "layer norm")
SLICES = ("x[:, t]", "x[t]", "unbind", "select", "split", "x[:, t:t+1]", "narrow")
OUTPUTS = ("states", "head", "last")


@dataclass(frozen=True)
class Program:
    cell: str
    slicing: str
    reverse: bool
    mask: bool
    embedding: bool
    in_place: bool
    columns: bool  # the state kept as (features, batch)
    leading_one: bool  # the initial state (1, B, H), each new state viewed as (B, H)
    output: str
    batch: int
    length: int
    features: int
    hidden: int

    @property
    def carries(self) -> int:
        return 2 if self.cell == "lstm" else 1

    @property
    def time_first(self) -> bool:
        return self.slicing == "x[t]"


class _Model(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        p = self.program = program
        gates = {"tanh": 1, "gru": 3, "lstm": 4, "gated residual": 2, "layer norm": 1}[p.cell]
        self.embedding = nn.Embedding(7, p.features) if p.embedding else None
        self.wx = nn.Linear(p.features, gates * p.hidden)
        self.wh = nn.Linear(p.hidden, gates * p.hidden, bias=p.cell != "tanh")
        self.norm = nn.LayerNorm(p.hidden) if p.cell == "layer norm" else None
        self.head = nn.Linear(p.hidden, 3) if p.output == "head" else None

    def step(self, x, *rest):
        """One step: ``(x_t[, keep_t], *carries) -> new carries``."""
        p = self.program
        keep = rest[0] if p.mask else None
        carries = rest[1:] if p.mask else rest
        if p.embedding:
            x = self.embedding(x)
        h = carries[0]
        if p.columns:  # h is (hidden, batch)
            new = (torch.tanh(self.wh.weight @ h + (self.wx(x)).T),)
        else:
            g = self.wx(x)
            if p.in_place:
                g.add_(self.wh(h))
            else:
                g = g + self.wh(h)
            new = self._cell(g, carries)
        if keep is not None:
            new = tuple(torch.where(keep, n, c) for n, c in zip(new, carries))
        if p.leading_one:  # (1, B, H) at the first step: back to the carry's (B, H)
            new = tuple(n.view(n.shape[-2], n.shape[-1]) for n in new)
        return new

    def _cell(self, g, carries):
        p, h = self.program, carries[0]
        if p.cell == "tanh":
            return (torch.tanh(g),)
        if p.cell == "layer norm":
            return (self.norm(torch.tanh(g)),)
        if p.cell == "gated residual":
            gate, update = g.chunk(2, -1)
            return (h + torch.sigmoid(gate) * torch.tanh(update),)
        if p.cell == "gru":
            r, z, n = g.chunk(3, -1)
            n = torch.tanh(n + torch.sigmoid(r))
            z = torch.sigmoid(z)
            return ((1 - z) * n + z * h,)
        i, f, u, o = g.chunk(4, -1)
        c = torch.sigmoid(f) * carries[1] + torch.sigmoid(i) * torch.tanh(u)
        return (torch.sigmoid(o) * torch.tanh(c), c)

    def inputs_at(self, x, mask, t: int):
        """The per-step inputs of step ``t``, as the reference takes them."""
        x_t = x[t] if self.program.time_first else x[:, t]
        return (x_t, mask[:, t, None]) if self.program.mask else (x_t,)

    def initial(self, x):
        p = self.program
        batch = x.shape[1] if p.time_first else x.shape[0]
        shape = (p.hidden, batch) if p.columns else (1, batch, p.hidden) if p.leading_one else (batch, p.hidden)
        return tuple(torch.zeros(shape, dtype=self.wx.weight.dtype) for _ in range(p.carries))

    def output(self, states):
        """What ``forward`` returns, from the states in iteration order."""
        p = self.program
        hs = [s[0] for s in states]
        if p.output == "last":
            return hs[-1]
        if p.output == "head":
            return torch.stack([self.head(h) for h in hs])
        return torch.stack(hs)

    def forward(self, x, mask=None):
        p = self.program
        carries = self.initial(x)
        length = x.shape[0] if p.time_first else x.shape[1]
        order = range(length - 1, -1, -1) if p.reverse else range(length)
        pieces = {"unbind": lambda: x.unbind(1), "split": lambda: x.split(1, 1)}
        sequence = pieces[p.slicing]() if p.slicing in pieces else None
        hs, outs = [], []
        for t in order:
            if p.slicing == "x[:, t]":
                x_t = x[:, t]
            elif p.slicing == "x[t]":
                x_t = x[t]
            elif p.slicing == "unbind":
                x_t = sequence[t]
            elif p.slicing == "split":
                x_t = sequence[t].squeeze(1)
            elif p.slicing == "select":
                x_t = x.select(1, t)
            elif p.slicing == "x[:, t:t+1]":
                x_t = x[:, t : t + 1].squeeze(1)
            else:
                x_t = x.narrow(1, t, 1).squeeze(1)
            step_inputs = (x_t, mask[:, t, None]) if p.mask else (x_t,)
            carries = self.step(*step_inputs, *carries)
            hs.append(carries[0])
            if p.output == "head":
                outs.append(self.head(carries[0]))
        if p.output == "last":
            return hs[-1]
        return torch.stack(outs if p.output == "head" else hs)


def make_model(program: Program) -> _Model:
    return _Model(program).double()


def make_inputs(program: Program, generator: torch.Generator):
    p = program
    shape = (p.length, p.batch) if p.time_first else (p.batch, p.length)
    if p.embedding:
        x = torch.randint(0, 7, shape, generator=generator)
    else:
        x = torch.randn(*shape, p.features, generator=generator, dtype=torch.float64)
    mask = torch.rand(p.batch, p.length, generator=generator) > 0.3 if p.mask else None
    return x, mask


def must_stay_exact(program: Program) -> bool:
    return program.in_place or program.columns


def check_invariant(program: Program, mode: str, seed: int = 0) -> str:
    """Check the module docstring's invariant; return "rewritten" or "left exact"."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_model(program)
    x, mask = make_inputs(program, generator)
    args = (x, mask) if program.mask else (x,)
    want = model(*args)
    weights = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    # The same λ for each carry: a loop's state is its carries in the order the step
    # computes them (c before h in a hand-written LSTM), which this check need not know.
    feedback = {"feedback": lambda loop: _lam(program, mode)} if mode == "dsf" else {}
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager", **feedback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compiled(*args)
    assert got.shape == want.shape and rel_err(got.detach(), want.detach()) <= 1e-10, "forward changed"
    (got * weights).sum().backward()
    report = dsf_compile.report(compiled)
    rewritten = len(report.loops) == 1
    if not rewritten:
        assert report.loops == [] and (report.left_exact or report.graph_breaks), "neither rewritten nor reported"
    if must_stay_exact(program):
        assert not rewritten, "a loop that must stay exact was rewritten"
    if mode == "bptt" or not rewritten:
        (want * weights).sum().backward()
        expected = [p.grad for p in model.parameters()]
    else:
        expected = _reference_grads(model, x, mask, weights, mode)
    for (name, p), w in zip(compiled.named_parameters(), expected):
        assert p.grad is not None and rel_err(p.grad, w) <= 1e-9, (name, rel_err(p.grad, w))
    return "rewritten" if rewritten else "left exact"


def _lam(program: Program, mode: str) -> torch.Tensor:
    """λ over a loop's state: linspace over each carry, repeated (zeros for ft)."""
    per_carry = torch.linspace(0, 1, program.hidden, dtype=torch.float64)
    return per_carry.repeat(program.carries) * (mode == "dsf")


def _reference_grads(model: _Model, x, mask, weights, mode: str):
    p = model.program
    length = x.shape[0] if p.time_first else x.shape[1]
    order = range(length - 1, -1, -1) if p.reverse else range(length)
    xs = [model.inputs_at(x, mask, t) for t in order]
    loss = lambda states: (model.output(states) * weights).sum()
    lam = _lam(p, mode)
    _, grads, _, _ = dsf_reference_loop(model.step, xs, model.initial(x), lam, loss, list(model.parameters()))
    return grads
