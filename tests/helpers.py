"""Building blocks shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import dsf_compile

MODULES = {
    "rnn_tanh": lambda *a, **k: nn.RNN(*a, nonlinearity="tanh", **k),
    "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
    "gru": nn.GRU,
    "lstm": nn.LSTM,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(kind, layers, bidirectional, batch_first, bias, with_h0, dtype, seed, dropout=0.0):
    """A module, an input and an initial state of random sizes, and a random linear loss."""
    g = torch.Generator().manual_seed(seed)
    size = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    T, B, n_in, H = size(1, 7), size(1, 4), size(1, 6), size(1, 6)
    torch.manual_seed(seed)
    module = MODULES[kind](n_in, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                           dropout=dropout).to(dtype)
    D = 2 if bidirectional else 1
    x = torch.randn((B, T, n_in) if batch_first else (T, B, n_in), dtype=dtype, generator=g)
    h0 = None
    if with_h0:
        h0 = torch.randn(layers * D, B, H, dtype=dtype, generator=g)
        if kind == "lstm":
            h0 = (h0, torch.randn(layers * D, B, H, dtype=dtype, generator=g))
    w_out = torch.randn((B, T, D * H) if batch_first else (T, B, D * H), dtype=dtype, generator=g)
    w_h = torch.randn(layers * D, B, H, dtype=dtype, generator=g)
    w_c = torch.randn(layers * D, B, H, dtype=dtype, generator=g)

    def loss_fn(out, h_n, c_n=None):
        loss = (out * w_out).sum() + (h_n * w_h).sum()
        return loss if c_n is None else loss + (c_n * w_c).sum()

    return module, x, h0, loss_fn


def leaf(t):
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(leaf(s) for s in t)
    return t.clone().requires_grad_()


def _train_once(model, x, h0, loss_fn):
    """One backward of ``loss_fn`` through ``model``: outputs and every gradient."""
    x, h0 = leaf(x), leaf(h0)
    out, hidden = model(x) if h0 is None else model(x, h0)
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    loss_fn(out, *hs).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["x"] = x.grad
    if h0 is not None:
        for name, t in zip(("h0", "c0"), h0 if isinstance(h0, tuple) else (h0,)):
            grads[name] = t.grad
    return (out.detach(), *(h.detach() for h in hs)), grads


def run_compiled(module, x, h0, loss_fn, mode, feedback="linspace", compiler="aot_eager", **options):
    """Apply dsf_compile to a copy of ``module``; outputs and gradients like the reference's."""
    model = dsf_compile.apply(copy.deepcopy(module), mode, feedback, compiler=compiler, **options)
    return (model, *_train_once(model, x, h0, loss_fn))


def run_eager(module, x, h0, loss_fn):
    """Exact BPTT by plain autograd on the original module."""
    return _train_once(copy.deepcopy(module), x, h0, loss_fn)


def assert_close(got: dict, want: dict, tol: float):
    for name, w in want.items():
        if name not in got:
            continue
        g = got[name]
        assert g is not None, f"no gradient for {name}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if w.norm() == 0:
            assert g.norm() <= tol, f"{name}: expected zero gradient, got norm {g.norm().item():.3g}"
        else:
            err = rel_err(g, w)
            assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


class GRUCellLoop(nn.Module):
    """The plainest hand-written recurrence: a Python loop over an nn.GRUCell, (T, B, F) in."""

    def __init__(self, n_in: int = 3, hidden: int = 4):
        super().__init__()
        self.cell = nn.GRUCell(n_in, hidden)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(h)
        return torch.stack(outs)


def assert_trains_exactly(model: nn.Module, mode: str, *args) -> dsf_compile.Report:
    """Apply ``mode`` to a copy of ``model``, which finds no loop to rewrite (and warns):
    its forward and gradients must be eager's.  Returns the copy's report."""
    import pytest

    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    with pytest.warns(UserWarning, match="no recurrent loop"):
        got = compiled(*args)
    want = model(*args)
    assert rel_err(got.detach(), want.detach()) <= 1e-12
    (got ** 2).sum().backward()
    (want ** 2).sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), model.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) <= 1e-12, name
    return dsf_compile.report(compiled)
