"""Beyond fixed λ: Highway-BP, adaptive λ and the gradient-fidelity probe (DESIGN.md §7).

Checked in float64 against exact autograd and against the literal per-step iteration of
``tests/reference.py``, whose highway diagonal K is written from each cell's formula.
"""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsf_compile
from dsf_compile.ops import reverse_linear_scan
from dsf_compile.rules.adaptive import mean_jacobian_diagonal
from dsf_compile.rules.highway import highway_refinement

from .helpers import GRUCellLoop, assert_close, make_case, rel_err, run_compiled, run_eager
from .reference import dsf_reference_loop, highway_reference_loop
from .test_ops import literal

D = torch.float64


@pytest.mark.parametrize("kind,layers,bidirectional,seed",
                         [(k, L, b, s) for k, L, b in itertools.product(["gru", "lstm"], [1, 2], [False, True])
                          for s in (2, 3)])  # seeds with T > 1
def test_highway_with_t_minus_one_iterations_is_bptt(kind, layers, bidirectional, seed):
    module, x, h0, loss_fn = make_case(kind, layers, bidirectional, seed % 2 == 0, True, True, D, seed)
    T = x.shape[1] if seed % 2 == 0 else x.shape[0]
    _, out, got = run_compiled(module, x, h0, loss_fn, "highway", iterations=max(T - 1, 0))
    want_out, want = run_eager(module, x, h0, loss_fn)
    for a, b in zip(out, want_out):
        assert torch.equal(a, b) or rel_err(a, b) <= 1e-12
    assert_close(got, want, 1e-10)


def _single_gru(kind="gru", T=9, seed=0, zero_recurrent=False):
    torch.manual_seed(seed)
    module = (nn.GRU if kind == "gru" else nn.LSTM)(3, 4).double()
    if zero_recurrent:
        with torch.no_grad():
            module.weight_hh_l0.zero_()
    x = torch.randn(T, 2, 3, dtype=D)
    w_out = torch.randn(T, 2, 4, dtype=D)
    return module, x, None, lambda out, *_: (out * w_out).sum()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_after_k_iterations_the_last_k_plus_one_steps_are_exact(kind, k):
    module, x, h0, loss_fn = _single_gru(kind)
    T = x.shape[0]
    _, _, got = run_compiled(module, x, h0, loss_fn, "highway", iterations=k)
    _, want = run_eager(module, x, h0, loss_fn)
    tail = slice(T - k - 1, T)
    assert rel_err(got["x"][tail], want["x"][tail]) <= 1e-12
    assert rel_err(got["x"][T - k - 2], want["x"][T - k - 2]) > 1e-6  # and no further


class ReversedGatedLoop(nn.Module):
    """A hand-written gated cell run backwards over time with a padding mask: the highway
    path goes through ``torch.where`` and ``lerp``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(3 + 4, 4)
        self.cand = nn.Linear(3 + 4, 4)

    def step(self, x, m, h):
        z = torch.sigmoid(self.gate(torch.cat([x, h], -1)))
        n = torch.tanh(self.cand(torch.cat([x, h], -1)))
        return (torch.where(m, torch.lerp(n, h, z), h),)

    def forward(self, x, mask):
        h = x.new_zeros(x.shape[1], 4)
        outs = [None] * x.shape[0]
        for t in reversed(range(x.shape[0])):
            (h,) = self.step(x[t], mask[t, :, None], h)
            outs[t] = h
        return torch.stack(outs)


def _gated_case(T=8, seed=0):
    torch.manual_seed(seed)
    model = ReversedGatedLoop().double()
    x = torch.randn(T, 3, 3, dtype=D)
    mask = torch.rand(T, 3) > 0.3
    w_out = torch.randn(T, 3, 4, dtype=D)
    return model, x, mask, w_out


def _gated_decay(model, x, m, h):
    z = torch.sigmoid(model.gate(torch.cat([x, h], -1)))
    return (torch.where(m, z, torch.ones_like(z)),)


@pytest.mark.parametrize("k", [0, 2, 7])
def test_a_reverse_loop_is_exact_on_its_first_k_plus_one_steps(k):
    model, x, mask, w_out = _gated_case()
    compiled = dsf_compile.apply(copy.deepcopy(model), "highway", compiler="aot_eager", iterations=k)
    xl, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    (compiled(xl, mask) * w_out).sum().backward()
    (model(xe, mask) * w_out).sum().backward()
    assert dsf_compile.report(compiled).loops[0].direction == "reverse"
    assert rel_err(xl.grad[: k + 1], xe.grad[: k + 1]) <= 1e-12
    if k + 1 < x.shape[0]:
        assert rel_err(xl.grad[k + 1], xe.grad[k + 1]) > 1e-6
    else:  # k = T - 1: exact BPTT, every parameter
        for p, q in zip(compiled.parameters(), model.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-12


@pytest.mark.parametrize("k", [0, 1, 3])
def test_hand_written_gated_cell_matches_the_literal_iteration(k):
    """K found in the graph (through where and lerp) and the batched iteration, against
    the reference's per-step loop with K written from the cell's formula."""
    model, x, mask, w_out = _gated_case(seed=k)
    compiled = dsf_compile.apply(copy.deepcopy(model), "highway", compiler="aot_eager", iterations=k)
    (compiled(x, mask) * w_out).sum().backward()
    T = x.shape[0]
    order = list(reversed(range(T)))
    xs = [(x[t], mask[t, :, None]) for t in order]
    init = (torch.zeros(3, 4, dtype=D),)

    def loss(states):
        return sum((st[0] * w_out[t]).sum() for st, t in zip(states, order))

    _, grads, _, _ = highway_reference_loop(model.step, lambda xt, m, h: _gated_decay(model, xt, m, h), xs, init,
                                            k, loss, list(model.parameters()))
    for (name, p), want in zip(compiled.named_parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-10, name


def test_nn_gru_matches_the_literal_iteration():
    torch.manual_seed(1)
    module = nn.GRU(3, 5).double()
    x, h0 = torch.randn(7, 2, 3, dtype=D), torch.randn(1, 2, 5, dtype=D)
    w_out = torch.randn(7, 2, 5, dtype=D)
    compiled = dsf_compile.apply(copy.deepcopy(module), "highway", compiler="aot_eager", iterations=2)
    h0_leaf = h0.clone().requires_grad_()
    (compiled(x, h0_leaf)[0] * w_out).sum().backward()
    params = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]

    def step(xt, h):
        return (_gru(xt, h, *params),)

    def decay(xt, h):
        z = torch.sigmoid((F.linear(xt, params[0], params[2]) + F.linear(h, params[1], params[3])).chunk(3, -1)[1])
        return (z,)

    _, grads, _, init_grad = highway_reference_loop(
        step, decay, [(x[t],) for t in range(7)], (h0[0],), 2,
        lambda states: sum((st[0] * w_out[t]).sum() for t, st in enumerate(states)), params)
    for (name, p), want in zip(compiled.named_parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-10, name
    assert rel_err(h0_leaf.grad[0], init_grad[0]) <= 1e-10


def _gru(x, h, w_ih, w_hh, b_ih, b_hh):
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def test_highway_k0_is_exact_for_a_gru_without_recurrent_weights_and_dsf_is_not():
    """With W_hh = 0 a GRU's Jacobian is diag(z): exactly the highway diagonal."""
    module, x, h0, loss_fn = _single_gru("gru", zero_recurrent=True)
    _, want = run_eager(module, x, h0, loss_fn)
    _, _, highway = run_compiled(module, x, h0, loss_fn, "highway", iterations=0)
    _, _, dsf = run_compiled(module, x, h0, loss_fn, "dsf")
    assert_close(highway, want, 1e-12)
    assert rel_err(dsf["x"], want["x"]) > 1e-3


def test_lstm_without_recurrent_weights_needs_one_iteration():
    """J = [[0, ∂h/∂c], [0, diag f]]: K holds the forget gate, and every path crosses the
    one non-highway block (c into h) at most once."""
    module, x, h0, loss_fn = _single_gru("lstm", zero_recurrent=True)
    _, want = run_eager(module, x, h0, loss_fn)
    _, _, k0 = run_compiled(module, x, h0, loss_fn, "highway", iterations=0)
    _, _, k1 = run_compiled(module, x, h0, loss_fn, "highway", iterations=1)
    assert rel_err(k0["weight_ih_l0"], want["weight_ih_l0"]) > 1e-3
    assert_close(k1, want, 1e-12)


def _gru_linearisation(T=6, B=2, H=4, seed=0):
    """A GRU's states, its direct gradients, K = z at every step, the batched ``J_tᵀ w``
    and the exact δ of BPTT, all written out here."""
    torch.manual_seed(seed)
    params = [torch.randn(3 * H, 3, dtype=D), torch.randn(3 * H, H, dtype=D) * 0.5,
              torch.randn(3 * H, dtype=D), torch.randn(3 * H, dtype=D)]
    x = torch.randn(T, B, 3, dtype=D)
    h, prev, states = torch.zeros(B, H, dtype=D), [], []
    for t in range(T):
        prev.append(h)
        h = _gru(x[t], h, *params)
        states.append(h)
    prev = torch.stack(prev)
    g = torch.randn(T, B, H, dtype=D)
    _, vjp = torch.func.vjp(lambda p: torch.func.vmap(_gru, in_dims=(0, 0, None, None, None, None))(x, p, *params),
                            prev)
    z = torch.sigmoid((F.linear(x, params[0], params[2]) + F.linear(prev, params[1], params[3])).chunk(3, -1)[1])
    # the exact δ_t = ∂L/∂s_t of L = Σ_t g_t · s_t, through the whole recurrence
    leaves = [s.clone().requires_grad_() for s in states]
    h, rebuilt = torch.zeros(B, H, dtype=D), []
    for t in range(T):
        h = _gru(x[t], h, *params) - states[t] + leaves[t]  # the value s_t, differentiable in leaf t
        rebuilt.append(h)
    exact = torch.stack(torch.autograd.grad(sum((gt * ht).sum() for gt, ht in zip(g, rebuilt)), leaves))
    return g, z, (lambda w: vjp(w)[0]), exact


def test_the_exact_delta_is_a_fixed_point_of_the_iteration():
    g, z, transposed, exact = _gru_linearisation()
    refined = highway_refinement(g, exact, z, transposed, reverse=False)
    assert rel_err(refined, exact) <= 1e-13
    w = reverse_linear_scan(g, torch.cat([z[1:], torch.zeros_like(z[:1])]), True)
    for _ in range(g.shape[0] - 1):
        w = highway_refinement(g, w, z, transposed, reverse=False)
    assert rel_err(w, exact) <= 1e-13


@pytest.mark.parametrize("backwards", [True, False])
def test_scan_with_a_decay_per_step_matches_the_literal_recurrence(backwards):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(11, 2, 5, dtype=D, generator=gen)
    decay = torch.rand(11, 2, 5, dtype=D, generator=gen)
    want = torch.empty_like(g)
    order = range(10, -1, -1) if backwards else range(11)
    acc = None
    for t in order:
        acc = g[t] if acc is None else g[t] + decay[t] * acc
        want[t] = acc
    assert torch.allclose(reverse_linear_scan(g, decay, backwards), want, rtol=1e-13, atol=1e-13)
    torch.library.opcheck(torch.ops.dsf.reverse_linear_scan.default, (g, decay, backwards))
    constant = torch.rand(5, dtype=D, generator=gen)
    assert torch.allclose(reverse_linear_scan(g, constant.expand_as(g).contiguous(), backwards),
                          literal(g, constant, backwards), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="decay of shape"):
        reverse_linear_scan(g, decay[0], backwards)


class DiagonalLinearRNN(nn.Module):
    """s_t = a ⊙ s_{t-1} + W x_t + b: its Jacobian is diag(a), the same at every step."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(3, a.numel())
        self.register_buffer("a", a)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.a.numel())
        outs = []
        for t in range(x.shape[0]):
            h = self.a * h + self.proj(x[t])
            outs.append(h)
        return torch.stack(outs)


def test_adaptive_lam_on_a_diagonal_linear_rnn_is_bptt():
    torch.manual_seed(0)
    model = DiagonalLinearRNN(torch.rand(6, dtype=D)).double()
    x, w_out = torch.randn(9, 4, 3, dtype=D), torch.randn(9, 4, 6, dtype=D)
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", "adaptive", compiler="aot_eager")
    (compiled(x) * w_out).sum().backward()
    (model(x) * w_out).sum().backward()
    for p, q in zip(compiled.parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12
    backend = compiled._dsf_backend
    (lam,) = backend.adaptive_estimates.values()
    assert torch.allclose(lam, model.a, atol=1e-14)
    assert "adaptive, now" in str(dsf_compile.report(compiled))
    linspace = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    linspace.zero_grad()
    (linspace(x) * w_out).sum().backward()
    assert rel_err(linspace.proj.weight.grad, model.proj.weight.grad) > 1e-3


def test_adaptive_lam_is_clipped_and_smoothed_across_backward_passes():
    torch.manual_seed(0)
    a = torch.tensor([0.2, 0.5, 1.5, -0.4], dtype=D)
    model = dsf_compile.apply(DiagonalLinearRNN(a.clone()).double(), "dsf", "adaptive", compiler="aot_eager",
                              momentum=0.75)
    x = torch.randn(5, 2, 3, dtype=D)
    model(x).sum().backward()
    estimates = model._dsf_backend.adaptive_estimates
    first = a.clamp(0, 1)
    assert torch.allclose(next(iter(estimates.values())), first, atol=1e-14)
    model.a.copy_(torch.tensor([0.6, 0.1, 0.3, 0.9], dtype=D))
    model(x).sum().backward()
    assert torch.allclose(next(iter(estimates.values())), 0.75 * first + 0.25 * model.a, atol=1e-14)


def test_hutchinson_estimate_converges_to_the_mean_diagonal():
    torch.manual_seed(0)
    S = 6
    jac = torch.randn(S, S, dtype=D)
    rows = torch.zeros(40_000, S, dtype=D)
    estimate = mean_jacobian_diagonal(rows, lambda v: v @ jac)  # every row's Jᵀv
    spread = (jac.pow(2).sum(0) - jac.diagonal().pow(2)).sqrt() / rows.shape[0] ** 0.5
    assert ((estimate - jac.diagonal()).abs() <= 5 * spread).all()
    diagonal = torch.diag(torch.randn(S, dtype=D))
    assert torch.allclose(mean_jacobian_diagonal(rows[:3], lambda v: v @ diagonal), diagonal.diagonal())


class GRULM(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.rnn = nn.GRU(3, 6, 2, dropout=dropout)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("mode,options,exact", [
    ("bptt", {}, True), ("highway", {"iterations": 9}, True), ("ft", {}, False), ("highway", {"iterations": 0}, False),
])
def test_gradient_fidelity(mode, options, exact):
    torch.manual_seed(0)
    model = dsf_compile.apply(GRULM(dropout=0.3).double(), mode, compiler="aot_eager", **options)
    x, y = torch.randn(10, 4, 3, dtype=D), torch.randint(0, 5, (10, 4))
    buffers_before = torch.get_rng_state()

    def closure():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    fidelity = dsf_compile.gradient_fidelity(model, closure)
    assert torch.equal(torch.get_rng_state(), buffers_before)
    assert all(p.grad is None for p in model.parameters())
    names = [p.name for p in fidelity.parameters]
    assert names == [n for n, _ in model.named_parameters()]
    head = {p.name: p for p in fidelity.parameters}["head.weight"]
    assert head.cosine == pytest.approx(1, abs=1e-12)  # the head is not in the recurrence
    if exact:
        assert fidelity.cosine == pytest.approx(1, abs=1e-12) and fidelity.relative_error <= 1e-10
    else:
        assert fidelity.cosine < 0.999 and fidelity.relative_error > 1e-3
        assert {p.name: p for p in fidelity.parameters}["rnn.weight_hh_l0"].cosine < 0.999
    assert "rnn.weight_hh_l0" in str(fidelity)
    # training goes on in the mode, through its own graphs
    closure().backward()
    assert dsf_compile.report(model).loops[0].rewrite.startswith(mode if mode != "bptt" else "exact")


def test_gradient_fidelity_needs_an_applied_model_and_a_loss():
    with pytest.raises(ValueError, match="dsf_compile.apply"):
        dsf_compile.gradient_fidelity(GRULM(), lambda: torch.zeros(()))
    model = dsf_compile.apply(GRULM().double(), "ft", compiler="aot_eager")
    x = torch.randn(4, 2, 3, dtype=D)
    with pytest.raises(TypeError, match="one-element tensor"):
        dsf_compile.gradient_fidelity(model, lambda: model(x))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        dsf_compile.gradient_fidelity(model, lambda: model(x).sum())


@pytest.mark.parametrize("options,message", [
    ({"mode": "dsf", "iterations": 2}, "option of mode='highway'"),
    ({"mode": "highway", "iterations": -1}, "int >= 0"),
    ({"mode": "highway", "iterations": 1.5}, "int >= 0"),
    ({"mode": "highway", "feedback": "uniform"}, "not from feedback"),
    ({"mode": "dsf", "feedback": "adaptive", "momentum": 1.0}, r"\[0, 1\)"),
    ({"mode": "dsf", "momentum": 0.5}, "has no effect"),
    ({"mode": "ft", "feedback": "adaptive"}, "not for mode='ft'"),
])
def test_mode_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        dsf_compile.apply(GRULM(), **options)


def test_highway_refuses_a_cell_without_a_residual_path():
    model = dsf_compile.apply(nn.RNN(3, 4), "highway", compiler="aot_eager")
    with pytest.raises(dsf_compile.UnsupportedLoopError, match="residual path.*nn.RNN"):
        model(torch.randn(5, 2, 3))


def test_report_and_explain_say_what_the_backward_does():
    x = torch.randn(6, 2, 3)
    lstm = nn.LSTM(3, 4)
    report = dsf_compile.explain(lstm, x, mode="highway", options={"iterations": 2})
    assert report.loops[0].rewrite == "highway (k = 2)" and report.loops[0].feedback == "K on c (0 on h)"
    report = dsf_compile.explain(nn.GRU(3, 4), x, mode="dsf", feedback="adaptive", options={"momentum": 0.5})
    assert report.loops[0].feedback == "adaptive (momentum 0.5)"


def _every_linear_op(x, h, w):
    a = torch.sigmoid(x @ w)  # a gate: off the path, a coefficient on it
    u = torch.add(h, x, alpha=2.0)
    u = u.sub(a * 3)
    u = torch.mul(a, u)
    u = u / (1 + a)
    u = -u
    u = torch.addcmul(u, a, h, value=0.5)
    u = torch.lerp(u, h, 0.25)
    u = torch.where(x > 0, u, h.clone())
    u = u.where(x < 1, torch.tanh(h))  # tanh(h): the carry, but through a nonlinearity
    return (u.contiguous().to(h.dtype),)


def test_highway_diagonal_rules_of_every_linear_op():
    from dsf_compile.step.highway import HighwayStep

    torch.manual_seed(0)
    x, h, w = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D), torch.randn(5, 5, dtype=D)
    step = HighwayStep(torch.fx.symbolic_trace(_every_linear_op), 1, 1)
    (out,), (K,) = step.run(x, h, w)
    assert torch.equal(out, _every_linear_op(x, h, w)[0])
    a = torch.sigmoid(x @ w)
    d = 0.75 * (-a / (1 + a) + 0.5 * a) + 0.25
    d = torch.where(x > 0, d, torch.ones_like(d))
    want = torch.where(x < 1, d, torch.zeros_like(d))
    assert torch.allclose(K, want, rtol=1e-14, atol=1e-14)


def test_adaptive_gradients_are_the_literal_dsf_reference_at_the_estimated_lam():
    """On a GRU cell loop (a dense Jacobian) the estimate is a random λ; whatever it is, the
    gradients must be DSF's at that λ, as the literal reference computes them."""
    torch.manual_seed(3)
    model = GRUCellLoop(3, 4).double()
    x, w_out = torch.randn(7, 2, 3, dtype=D), torch.randn(7, 2, 4, dtype=D)
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", "adaptive", compiler="aot_eager")
    out = compiled(x)
    assert rel_err(out.detach(), model(x).detach()) <= 1e-12
    (out * w_out).sum().backward()
    (lam,) = compiled._dsf_backend.adaptive_estimates.values()
    assert 0 < lam.min() and lam.max() < 1 and lam.shape == (4,)
    loss = lambda states: sum((s[0] * w_out[t]).sum() for t, s in enumerate(states))
    _, want, _, _ = dsf_reference_loop(lambda xt, h: (model.cell(xt, h),), [(x[t],) for t in range(7)],
                                       (torch.zeros(2, 4, dtype=D),), lam, loss, list(model.parameters()))
    for (name, p), w in zip(compiled.named_parameters(), want):
        assert rel_err(p.grad, w) <= 1e-10, name
