"""Backward rules as a public API (DESIGN.md §9): the primitives a rule is written with,
a user's rule against the built-in one it restates, truncated BPTT against its literal
definition, and auto's choice of refinements; in float64 against independent references."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsf_compile
from dsf_compile.cells import trace_step
from dsf_compile.loop_ir import LoopIR

from .helpers import GRUCellLoop, assert_close, make_case, rel_err, run_compiled, run_eager

D = torch.float64


class LiteralDSF(dsf_compile.Rule):
    """DSF restated with the public primitives (the docs' worked example)."""

    def __init__(self, lam: float):
        self.lam = lam

    def deltas(self, loop):
        return loop.scan(loop.g, self.lam)

    def initial_gradient(self, loop, delta):
        return self.lam * loop.first(delta)

    def describe(self):
        return f"literal dsf (λ = {self.lam})"


@pytest.mark.parametrize("kind,layers,bidirectional,seed", [("gru", 2, True, 2), ("lstm", 1, True, 3),
                                                            ("rnn_tanh", 2, False, 4)])
def test_a_user_rule_restating_dsf_equals_the_built_in_dsf(kind, layers, bidirectional, seed):
    module, x, h0, loss_fn = make_case(kind, layers, bidirectional, False, True, True, D, seed)
    _, out, got = run_compiled(module, x, h0, loss_fn, LiteralDSF(0.7))
    _, want_out, want = run_compiled(module, x, h0, loss_fn, "dsf", 0.7)
    for a, b in zip(out, want_out):
        assert rel_err(a, b) <= 1e-12
    assert_close(got, want, 1e-12)
    assert all(g.norm() > 0 for g in got.values() if g is not None)


def test_user_rules_are_reported_and_refuse_stray_options():
    model = GRUCellLoop().double()
    report = dsf_compile.explain(model, torch.randn(5, 2, 3, dtype=D), mode=LiteralDSF(0.5))
    assert report.loops[0].rewrite == "literal dsf (λ = 0.5)"
    with pytest.raises(ValueError, match="takes its options itself"):
        dsf_compile.apply(model, LiteralDSF(0.5), window=2)
    with pytest.raises(ValueError, match="window=2 is an option of mode='tbptt', not of mode='highway'"):
        dsf_compile.apply(model, "highway", window=2)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        dsf_compile.apply(model, "tbptt", window=-1)
    with pytest.raises(ValueError, match="target must be a cosine"):
        dsf_compile.apply(model, "auto", target=1.5)
    with pytest.raises(ValueError, match="feedback is λ of mode='dsf'"):
        dsf_compile.apply(model, "tbptt", feedback=0.5)


def test_a_registered_rule_is_a_mode():
    dsf_compile.register_rule("literal-dsf", LiteralDSF)
    try:
        model, x = GRUCellLoop().double(), torch.randn(5, 2, 3, dtype=D)
        compiled = dsf_compile.apply(copy.deepcopy(model), "literal-dsf", lam=0.3, compiler="aot_eager")
        compiled(x).sum().backward()
        reference = dsf_compile.apply(copy.deepcopy(model), "dsf", 0.3, compiler="aot_eager")
        reference(x).sum().backward()
        for p, q in zip(compiled.parameters(), reference.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-12
    finally:
        del dsf_compile.RULES["literal-dsf"]


def _gru_loop(T=6, B=3, H=4, seed=0, reverse=False):
    """A GRU step body as a loop, its inputs, weights and states (run here step by step)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(3 * H, 3, generator=g, dtype=D), 0.6 * torch.randn(3 * H, H, generator=g, dtype=D),
               torch.randn(3 * H, generator=g, dtype=D), torch.randn(3 * H, generator=g, dtype=D)]
    body = trace_step("gru", True)
    loop = LoopIR("gru", body, ("h",), (H,), 1, 4, reverse, "test", "test")
    x, h = torch.randn(T, B, 3, generator=g, dtype=D), torch.randn(B, H, generator=g, dtype=D)
    previous, states = [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        previous[t] = h
        h = states[t] = body(x[t], h, *weights)[0]
    return loop, x, weights, torch.stack(previous), torch.stack(states), g


@pytest.mark.parametrize("reverse", [False, True])
def test_transposed_and_local_gradients_are_autograds_per_step_vjps(reverse):
    loop, x, weights, previous, _, g = _gru_loop(reverse=reverse)
    direct = torch.randn(previous.shape, generator=g, dtype=D)
    backward = dsf_compile.LoopBackward(loop, [direct], [x], [previous], weights)
    w = torch.randn(previous.shape, generator=g, dtype=D)
    got = backward.transposed(w)
    delta = torch.randn(previous.shape, generator=g, dtype=D)
    x_grads, w_grads = backward.local_gradients(delta)
    want_w = [torch.zeros_like(p) for p in weights]
    for t in range(x.shape[0]):
        prev = previous[t].clone().requires_grad_()
        with torch.enable_grad():
            new = loop.body(x[t], prev, *weights)[0]
            (vjp,) = torch.autograd.grad(new, prev, w[t])
        assert rel_err(got[t], vjp) <= 1e-13
        leaves = [x[t].clone().requires_grad_(), *(p.clone().requires_grad_() for p in weights)]
        with torch.enable_grad():
            found = torch.autograd.grad(loop.body(leaves[0], previous[t], *leaves[1:])[0], leaves, delta[t])
        assert rel_err(x_grads[0][t], found[0]) <= 1e-13
        want_w = [a + b for a, b in zip(want_w, found[1:])]
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(w_grads, want_w))
    assert torch.equal(backward.first(w), w[-1 if reverse else 0])
    assert torch.equal(backward.shift(w)[-1 if not reverse else 0], torch.zeros_like(w[0]))


def test_the_scan_takes_a_number_a_vector_or_a_decay_per_step():
    loop, x, weights, previous, _, g = _gru_loop()
    backward = dsf_compile.LoopBackward(loop, [previous], [x], [previous], weights)
    values = torch.randn(previous.shape, generator=g, dtype=D)
    lam = torch.rand(previous.shape[-1], generator=g, dtype=D)
    by_vector = backward.scan(values, lam)
    assert torch.allclose(backward.scan(values, lam.tolist()), by_vector, rtol=0, atol=1e-14)
    assert torch.allclose(backward.scan(values, lam.expand_as(values)), by_vector, rtol=0, atol=1e-14)
    want, acc = torch.empty_like(values), torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        acc = values[t] + 0.5 * acc
        want[t] = acc
    assert torch.allclose(backward.scan(values, 0.5), want, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="decay of 3 values for a state of 4 units"):
        backward.scan(values, [0.1, 0.2, 0.3])


def test_exact_is_bptts_delta_and_highway_diagonal_is_the_update_gate():
    loop, x, weights, previous, states, g = _gru_loop()
    direct = torch.randn(previous.shape, generator=g, dtype=D)
    backward = dsf_compile.LoopBackward(loop, [direct], [x], [previous], weights)
    leaves = [s.clone().requires_grad_() for s in states]
    h, rebuilt = previous[0], []
    for t in range(x.shape[0]):  # the value s_t, differentiable through the recurrence and in leaf t
        h = loop.body(x[t], h, *weights)[0] - states[t] + leaves[t]
        rebuilt.append(h)
    with torch.enable_grad():
        exact = torch.autograd.grad(sum((d * s).sum() for d, s in zip(direct, rebuilt)), leaves)
    assert rel_err(backward.exact(), torch.stack(exact)) <= 1e-12
    z = torch.sigmoid((F.linear(x, weights[0], weights[2]) + F.linear(previous, weights[1], weights[3]))
                      .chunk(3, -1)[1])
    assert rel_err(backward.highway_diagonal(), z) <= 1e-14


def _truncated_reference(cell, x, h0, weights_out, window):
    """Truncated BPTT, literally: each loss term w_t · s_t backpropagated through its last
    ``window + 1`` steps, the state before them held constant (the initial state itself
    when the window reaches it)."""
    T = x.shape[0]
    x = x.clone().requires_grad_()
    with torch.no_grad():
        states, h = [h0], h0
        for t in range(T):
            h = cell(x[t], h)
            states.append(h)
    for t in range(1, T + 1):
        start = t - window - 1
        s = states[start].detach() if start >= 0 else h0
        for u in range(max(start, 0) + 1, t + 1):
            s = cell(x[u - 1], s)
        (weights_out[t - 1] * s).sum().backward()
    return x.grad


@pytest.mark.parametrize("window", [0, 1, 2, 5, 6])
def test_truncated_bptt_is_each_loss_term_through_its_last_window_transitions(window):
    torch.manual_seed(0)
    model = GRUCellLoop(3, 4).double()
    T = 6
    x, w_out = torch.randn(T, 2, 3, dtype=D), torch.randn(T, 2, 4, dtype=D)
    h0 = torch.randn(2, 4, dtype=D)

    class WithStart(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, h):
            states = []
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
                states.append(h)
            return torch.stack(states)

    compiled = dsf_compile.apply(WithStart(copy.deepcopy(model.cell)), "tbptt", window=window, compiler="aot_eager")
    x_leaf, h_leaf = x.clone().requires_grad_(), h0.clone().requires_grad_()
    (compiled(x_leaf, h_leaf) * w_out).sum().backward()
    reference = copy.deepcopy(model.cell)
    h_ref = h0.clone().requires_grad_()
    x_grad = _truncated_reference(reference, x, h_ref, w_out, window)
    for p, q in zip(compiled.parameters(), reference.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12
    assert rel_err(x_leaf.grad, x_grad) <= 1e-12
    assert rel_err(h_leaf.grad, h_ref.grad) <= 1e-12 if h_ref.grad is not None else h_leaf.grad.norm() == 0
    (loop,) = dsf_compile.report(compiled).loops
    assert loop.rewrite == f"tbptt (window {window})"


@pytest.mark.parametrize("kind,bidirectional,seed", [("gru", True, 2), ("lstm", False, 3)])
def test_truncated_bptt_ends_are_ft_and_bptt(kind, bidirectional, seed):
    module, x, h0, loss_fn = make_case(kind, 1, bidirectional, False, True, True, D, seed)
    T = x.shape[0]
    _, _, ft = run_compiled(module, x, h0, loss_fn, "ft")
    _, _, zero = run_compiled(module, x, h0, loss_fn, "tbptt", window=0)
    assert_close(zero, ft, 1e-13)
    _, want = run_eager(module, x, h0, loss_fn)
    _, _, full = run_compiled(module, x, h0, loss_fn, "tbptt", window=T)
    assert_close(full, want, 1e-11)
    _, _, almost = run_compiled(module, x, h0, loss_fn, "tbptt", window=T - 1)
    assert_close({k: v for k, v in almost.items() if k not in ("h0", "c0")}, want, 1e-11)


def _lstm_without_recurrent_weights(T=8):
    torch.manual_seed(0)
    module = nn.LSTM(3, 4).double()
    with torch.no_grad():
        module.weight_hh_l0.zero_()
    x, w_out = torch.randn(T, 2, 3, dtype=D), torch.randn(T, 2, 4, dtype=D)
    return module, x, None, lambda out, *_: (out * w_out).sum()


def test_auto_picks_the_fewest_refinements_that_reach_its_target_and_says_so():
    """An LSTM without recurrent weights needs one highway refinement (its Jacobian crosses
    the non-highway block c → h at most once): k = 0 falls short, k = 1 is exact."""
    module, x, h0, loss_fn = _lstm_without_recurrent_weights()
    model, _, got = run_compiled(module, x, h0, loss_fn, "auto", target=0.999999, every=3)
    _, want = run_eager(module, x, h0, loss_fn)
    assert_close(got, want, 1e-12)
    (loop,) = dsf_compile.report(model).loops
    assert loop.rewrite == "auto (target 0.999999)"
    assert loop.feedback.startswith("K, k = 1 (cosine 1.0000 at backward 1")
    _, _, k0 = run_compiled(module, x, h0, loss_fn, "highway", iterations=0)
    assert rel_err(k0["weight_ih_l0"], want["weight_ih_l0"]) > 1e-3  # one refinement was needed
    # between measurements it runs the k it chose; the next measurement is at backward 3
    for p in model.parameters():
        p.grad = None
    out, _ = model(x)
    loss_fn(out).backward()
    assert "at backward 1)" in dsf_compile.report(model).loops[0].feedback
    assert rel_err(model.weight_ih_l0.grad, want["weight_ih_l0"]) <= 1e-12


def test_auto_stops_at_its_most_refinements_and_says_the_target_was_not_met():
    torch.manual_seed(1)
    model, x = GRUCellLoop(3, 4).double(), torch.randn(9, 2, 3, dtype=D)
    compiled = dsf_compile.apply(model, "auto", target=1.0, max_iterations=1, compiler="aot_eager")
    compiled(x).sum().backward()
    feedback = dsf_compile.report(compiled).loops[0].feedback
    assert feedback.startswith("K, k = 1 (cosine") and feedback.endswith("target not met)")


@pytest.mark.parametrize("mode,options", [("tbptt", {"window": 2}), ("auto", {"every": 1}),
                                          (LiteralDSF(0.5), {})])
def test_every_rule_works_with_gradient_fidelity_explain_and_the_reverse_direction(mode, options):
    torch.manual_seed(0)
    module = nn.GRU(3, 4, bidirectional=True).double()
    x, y = torch.randn(7, 2, 3, dtype=D), torch.randn(7, 2, 8, dtype=D)
    explained = dsf_compile.explain(module, x, mode=mode, options=options)
    assert [loop.direction for loop in explained.loops] == ["forward", "reverse"]
    model = dsf_compile.apply(copy.deepcopy(module), mode, compiler="aot_eager", **options)
    state = copy.deepcopy(getattr(model._dsf_backend.rule, "measured", None))
    fidelity = dsf_compile.gradient_fidelity(model, lambda: F.mse_loss(model(x)[0], y))
    assert 0 < fidelity.cosine <= 1 + 1e-9 and all(p.grad is None for p in model.parameters())
    if state is not None:  # auto measured inside gradient_fidelity, and nothing of it is kept
        assert model._dsf_backend.rule.measured == state
    F.mse_loss(model(x)[0], y).backward()
    report = dsf_compile.report(model)
    assert [loop.rewrite for loop in report.loops] == [loop.rewrite for loop in explained.loops]
    assert all(p.grad is not None for p in model.parameters())
