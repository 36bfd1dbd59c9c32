"""Re-rolled Python loops under apply() against the literal reference."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsf_compile

from .helpers import assert_trains_exactly, rel_err
from .reference import dsf_reference_loop

B, IN, H = 3, 4, 5


class GRUCellLoop(nn.Module):
    """x[:, t], outputs stacked on dim 1, final state returned."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)

    def step(self, x, h):
        return (self.cell(x, h),)

    def forward(self, x, h):
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1), h

    def split_input(self, x):
        return [(x[:, t],) for t in range(x.shape[1])]


class ReversedLSTMCellLoop(nn.Module):
    """reversed(x.split(1, 0)), (h, c) carries, outputs concatenated."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(IN, H)

    def step(self, x, h, c):
        return self.cell(x, (h, c))

    def forward(self, x, h, c):
        outs = []
        for xt in reversed(x.split(1, 0)):
            h, c = self.cell(xt[0], (h, c))
            outs.append(h)
        return torch.cat(outs), c

    def split_input(self, x):
        return [(x[t],) for t in reversed(range(x.shape[0]))]


class HandWrittenCell(nn.Module):
    """x.unbind(0); linear, chunk, gating, layer norm and a residual inside the step."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, 3 * H)
        self.rec = nn.Linear(H, 3 * H, bias=False)
        self.norm = nn.LayerNorm(H)

    def step(self, x, h):
        a, b, c = (self.inp(x) + self.rec(h)).chunk(3, -1)
        gate = torch.sigmoid(a)
        cand = torch.tanh(self.norm(b) + F.gelu(c))
        return (gate * h + (1 - gate) * cand + 0.1 * h,)

    def forward(self, x, h):
        outs = []
        for xt in x.unbind(0):
            (h,) = self.step(xt, h)
            outs.append(h)
        return torch.stack(outs), h

    def split_input(self, x):
        return [(x[t],) for t in range(x.shape[0])]


class TwoLayersOneLoop(nn.Module):
    """Two cells advanced inside one time loop, x[t], a per-step head."""

    def __init__(self):
        super().__init__()
        self.lower = nn.RNNCell(IN, H)
        self.upper = nn.GRUCell(H, H)
        self.head = nn.Linear(H, 2)

    def step(self, x, h1, h2):
        h1 = self.lower(x, h1)
        return h1, self.upper(h1, h2)

    def forward(self, x, h1, h2):
        ys = []
        for t in range(x.shape[0]):
            h1 = self.lower(x[t], h1)
            h2 = self.upper(h1, h2)
            ys.append(self.head(h2))
        return torch.stack(ys), h2

    def split_input(self, x):
        return [(x[t],) for t in range(x.shape[0])]


class MatmulCell(nn.Module):
    """x.chunk(T, 1); raw parameters with matmul, split and cat inside the step, two carries."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(IN, 2 * H) * 0.3)
        self.u = nn.Parameter(torch.randn(2 * H, 2 * H) * 0.3)

    def step(self, x, h, m):
        pre = x @ self.w + torch.cat([h, m], -1) @ self.u
        a, b = pre.split(H, -1)
        return torch.tanh(a) * torch.sigmoid(b), 0.5 * m + 0.5 * torch.tanh(b)

    def forward(self, x, h, m):
        outs = []
        for piece in x.chunk(x.shape[1], 1):
            h, m = self.step(piece.squeeze(1), h, m)
            outs.append(h)
        return torch.stack(outs, 1), m

    def split_input(self, x):
        return [(x[:, t],) for t in range(x.shape[1])]


CASES = {
    "gru_cell": (GRUCellLoop, lambda T: (torch.randn(B, T, IN),), 1),
    "lstm_cell_reversed": (ReversedLSTMCellLoop, lambda T: (torch.randn(T, B, IN),), 2),
    "hand_written": (HandWrittenCell, lambda T: (torch.randn(T, B, IN),), 1),
    "two_layers_head": (TwoLayersOneLoop, lambda T: (torch.randn(T, B, IN),), 2),
    "matmul_split_cat": (MatmulCell, lambda T: (torch.randn(B, T, IN),), 2),
}


def _loss_weights(model, x, init):
    torch.manual_seed(99)
    with torch.no_grad():
        outs = model(x, *init)
    return [torch.randn_like(o) for o in outs]


def _loss(outs, weights):
    return sum((o * w).sum() for o, w in zip(outs, weights))


@pytest.mark.parametrize("mode", ["dsf", "ft"])
@pytest.mark.parametrize("name", list(CASES))
def test_python_loop_matches_literal_reference(name, mode):
    cls, make_x, n_carries = CASES[name]
    torch.manual_seed(0)
    model = cls().double()
    T = 6
    (x,) = [t.double() for t in make_x(T)]
    init = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(n_carries))
    weights = _loss_weights(model, x, init)
    S = H * n_carries
    lam = torch.linspace(0, 1, S, dtype=torch.float64) if mode == "dsf" else torch.zeros(S, dtype=torch.float64)

    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    x_leaf = x.clone().requires_grad_()
    init_leaf = tuple(c.clone().requires_grad_() for c in init)
    outs = compiled(x_leaf, *init_leaf)
    with torch.no_grad():
        want_outs = model(x, *init)
    for got, want in zip(outs, want_outs):
        assert rel_err(got.detach(), want) <= 1e-12
    _loss(outs, weights).backward()
    report = dsf_compile.report(compiled)
    assert len(report.loops) == 1 and report.loops[0].length == str(T)
    assert report.loops[0].state_size == S

    # the reference: the same loss, as a function of the states
    params = list(model.parameters())
    xs = model.split_input(x)

    def loss_of_states(states):
        # re-run the readout from states: rebuild outputs exactly as forward does
        return _loss(_outputs_from_states(model, name, x, states), weights)

    _, grads, x_grads, init_grad = dsf_reference_loop(model.step, xs, init, lam, loss_of_states, params)
    for (pname, p), want in zip(compiled.named_parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-9, pname
    for got, want in zip(init_leaf, init_grad):
        assert rel_err(got.grad, want) <= 1e-9 if want.norm() > 0 else got.grad.norm() <= 1e-12
    want_x = _assemble_x_grad(name, x, x_grads)
    assert rel_err(x_leaf.grad, want_x) <= 1e-9


def _outputs_from_states(model, name, x, states):
    if name == "gru_cell":
        hs = [s[0] for s in states]
        return torch.stack(hs, 1), hs[-1]
    if name == "lstm_cell_reversed":
        return torch.cat([s[0] for s in states]), states[-1][1]
    if name == "hand_written":
        hs = [s[0] for s in states]
        return torch.stack(hs), hs[-1]
    if name == "matmul_split_cat":
        return torch.stack([s[0] for s in states], 1), states[-1][1]
    h2s = [s[1] for s in states]
    return torch.stack([model.head(h) for h in h2s]), h2s[-1]


def _assemble_x_grad(name, x, x_grads):
    if name in ("gru_cell", "matmul_split_cat"):
        return torch.stack([g[0] for g in x_grads], 1)
    if name == "lstm_cell_reversed":
        return torch.stack([g[0] for g in reversed(x_grads)])
    return torch.stack([g[0] for g in x_grads])


def test_diagonal_linear_loop_with_feedback_a_is_exact_bptt():
    """s_t = a ⊙ s_{t-1} + W x_t: the Jacobian is diag(a), so DSF with λ = a is BPTT."""

    class DiagonalLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.rand(H, dtype=torch.float64))
            self.w = nn.Linear(IN, H).double()

        def forward(self, x):
            s = torch.zeros(x.shape[1], H, dtype=x.dtype)
            outs = []
            for t in range(x.shape[0]):
                s = self.a * s + self.w(x[t])
                outs.append(s)
            return torch.stack(outs)

    torch.manual_seed(3)
    model = DiagonalLinear()
    ref = copy.deepcopy(model)
    a = model.a.detach().clone()
    dsf_compile.apply(model, "dsf", feedback=a, compiler="aot_eager")
    x = torch.randn(7, B, IN, dtype=torch.float64)
    w = torch.randn(7, B, H, dtype=torch.float64)
    (model(x) * w).sum().backward()
    (ref(x) * w).sum().backward()
    assert len(dsf_compile.report(model).loops) == 1
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9, name


class Encoder(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.cell = nn.GRUCell(IN, size)
        self.size = size

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.size)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(h)
        return torch.stack(outs)


class TwoLoops(nn.Module):
    """Two independent loops, inside submodules' forward, one of them run backwards."""

    def __init__(self):
        super().__init__()
        self.forward_rnn = Encoder(H)
        self.backward_rnn = Encoder(H + 1)

    def forward(self, x):
        return self.forward_rnn(x).sum(-1) + self.backward_rnn(x.flip(0)).sum(-1)


def test_explain_lists_exactly_the_loops_present():
    report = dsf_compile.explain(TwoLoops().double(), torch.randn(6, B, IN, dtype=torch.float64))
    assert sorted((r.length, r.batch, r.state_size, r.direction) for r in report.loops) == [
        ("6", str(B), H, "forward"),
        ("6", str(B), H + 1, "forward"),
    ]
    assert all("test_python_loops.py" in r.source for r in report.loops)
    report = dsf_compile.explain(ReversedLSTMCellLoop(), torch.randn(5, B, IN), torch.zeros(B, H), torch.zeros(B, H))
    (loop,) = report.loops
    assert (loop.length, loop.state_size, loop.direction) == ("5", 2 * H, "reverse")


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_two_loops_against_eager_bptt_and_reference(mode):
    torch.manual_seed(4)
    model = TwoLoops().double()
    x = torch.randn(5, B, IN, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    (compiled(x) ** 2).sum().backward()
    assert len(dsf_compile.report(compiled).loops) == 2
    if mode == "bptt":
        (model(x) ** 2).sum().backward()
        for p, q in zip(compiled.parameters(), model.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-9
        return
    # DSF: each loop against the reference, the other loop's output held fixed
    with torch.no_grad():
        other = model.backward_rnn(x.flip(0)).sum(-1)
    enc = model.forward_rnn
    lam = torch.linspace(0, 1, H, dtype=torch.float64)
    xs = [(x[t],) for t in range(5)]
    loss = lambda states: ((torch.stack([s[0] for s in states]).sum(-1) + other) ** 2).sum()
    _, grads, _, _ = dsf_reference_loop(lambda xt, h: (enc.cell(xt, h),), xs, (torch.zeros(B, H, dtype=torch.float64),),
                                        lam, loss, list(enc.cell.parameters()))
    for p, want in zip(compiled.forward_rnn.cell.parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-9


class BranchOnT(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            if t % 2:
                h = torch.tanh(h)
        return h


class NoStepInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(H, H)

    def forward(self, h):
        for _ in range(4):
            h = self.cell(h, h)
        return h


class DataDependentLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        t = 0
        while t < x.shape[0] and h.norm() < 1e9:
            h = self.cell(x[t], h)
            t += 1
        return h


@pytest.mark.parametrize("model_cls,shape,reason", [
    (BranchOnT, (6, B, IN), "step"),
    (NoStepInput, (B, H), None),
    (DataDependentLength, (4, B, IN), None),
    (GRUCellLoop, None, None),
])
def test_loops_we_cannot_reroll_stay_exact_and_are_reported(model_cls, shape, reason):
    torch.manual_seed(5)
    model = model_cls().double()
    if model_cls is GRUCellLoop:  # T = 1: a single step, no loop
        args = (torch.randn(B, 1, IN, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    else:
        args = (torch.randn(*shape, dtype=torch.float64),)
    report = dsf_compile.explain(model, *args)
    assert report.loops == []
    if reason:
        assert report.left_exact and all(reason in item.reason for item in report.left_exact)
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    leaves = [a.clone().requires_grad_() for a in args]
    with pytest.warns(UserWarning, match="no recurrent loop"):
        out = compiled(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    (out ** 2).sum().backward()
    ref_out = model(*args)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    (ref_out ** 2).sum().backward()
    for p, q in zip(compiled.parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9


class ScanGRU(nn.Module):
    """A loop written with torch's scan; per-step outputs are a head of the state."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)
        self.head = nn.Linear(H, 2)

    def step(self, x, h):
        return (self.cell(x, h),)

    def forward(self, x, h):
        from torch._higher_order_ops.scan import scan

        def combine(h, xt):
            h = self.cell(xt, h)
            return h, self.head(h)

        h_n, ys = scan(combine, h, x)
        return ys, h_n


@pytest.mark.parametrize("h0_requires_grad", [True, False])
@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_scan_loop(mode, h0_requires_grad):
    torch.manual_seed(6)
    model = ScanGRU().double()
    x = torch.randn(6, B, IN, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    w_y, w_h = torch.randn(6, B, 2, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    loss = lambda ys, h_n: (ys * w_y).sum() + (h_n * w_h).sum()
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    h_leaf = h0.clone().requires_grad_(h0_requires_grad)
    outs = compiled(x, h_leaf)
    loss(*outs).backward()
    (loop,) = dsf_compile.report(compiled).loops
    # scan takes the whole sequence, so its length may be traced as a symbol
    assert loop.origin.startswith("torch scan") and (loop.length == "6" or not loop.length.isdigit())
    params = list(model.parameters())
    if mode == "bptt":
        # exact, also where torch 2.11's own scan gradient is wrong (a carry without grad)
        h_ref = h0.clone().requires_grad_(h0_requires_grad)
        h, ys = h_ref, []
        for t in range(6):
            h = model.cell(x[t], h)
            ys.append(model.head(h))
        loss(torch.stack(ys), h).backward()
        for p, q in zip(compiled.parameters(), params):
            assert rel_err(p.grad, q.grad) <= 1e-9
        return
    lam = torch.linspace(0, 1, H, dtype=torch.float64)

    def loss_of_states(states):
        hs = [s[0] for s in states]
        return loss(torch.stack([model.head(h) for h in hs]), hs[-1])

    _, grads, _, init_grad = dsf_reference_loop(model.step, [(x[t],) for t in range(6)], (h0,), lam,
                                                loss_of_states, params)
    for p, want in zip(compiled.parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-9
    if h0_requires_grad:
        assert rel_err(h_leaf.grad, init_grad[0]) <= 1e-9


def test_input_projection_is_hoisted_out_of_the_forward_loop():
    from dsf_compile.passes.find_python_loops import find_python_loops
    from dsf_compile.step.hoist import hoist_step_inputs

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with dsf_compile.recurrent_ops_visible():
        torch.compile(HandWrittenCell(), backend=capture)(torch.randn(5, B, IN), torch.randn(B, H))
    (found,), _ = find_python_loops(graphs[0])
    hoisted = hoist_step_inputs(found.loop.body, 1, 1)
    linears = lambda gm: [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert len(linears(found.loop.body)) == 2
    assert len(linears(hoisted.pre)) == 1 and len(linears(hoisted.rest)) == 1
    # the hoisted linear reads the step input, the remaining one the carry
    (rest_linear,) = linears(hoisted.rest)
    assert rest_linear.args[0].name.startswith("prev_")


class DropoutInStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        outs = []
        for t in range(x.shape[0]):
            h = self.drop(self.cell(x[t], h))
            outs.append(h)
        return torch.stack(outs)


def test_random_op_inside_the_step_is_left_exact():
    report = dsf_compile.explain(DropoutInStep().train(), torch.randn(5, B, IN))
    assert report.loops == []
    assert any("random" in item.reason for item in report.left_exact)
    # in eval mode dropout is the identity and the loop is rewritten
    assert len(dsf_compile.explain(DropoutInStep().eval(), torch.randn(5, B, IN)).loops) == 1


class StartFromFirstStep(nn.Module):
    """The first slice seeds the state; the loop runs over the rest (range(1, T))."""

    def __init__(self):
        super().__init__()
        self.start = nn.Linear(IN, H)
        self.cell = nn.GRUCell(IN, H)

    def forward(self, x):
        h = torch.tanh(self.start(x[:, 0]))
        outs = []
        for t in range(1, x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1)


def test_loop_over_a_subrange_with_a_seed_slice():
    torch.manual_seed(8)
    model = StartFromFirstStep().double()
    x = torch.randn(B, 7, IN, dtype=torch.float64)
    w = torch.randn(B, 6, H, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    out = compiled(x)
    assert rel_err(out.detach(), model(x).detach()) <= 1e-12
    (out * w).sum().backward()
    (loop,) = dsf_compile.report(compiled).loops
    assert loop.length == "6"
    lam = torch.linspace(0, 1, H, dtype=torch.float64)
    h0 = torch.tanh(model.start(x[:, 0]))
    loss = lambda states: (torch.stack([s[0] for s in states], 1) * w).sum()
    _, grads, _, (g_h0,) = dsf_reference_loop(lambda xt, h: (model.cell(xt, h),), [(x[:, t],) for t in range(1, 7)],
                                              (h0.detach(),), lam, loss, list(model.cell.parameters()))
    start_grads = torch.autograd.grad(h0, list(model.start.parameters()), g_h0)
    for p, want in zip(compiled.cell.parameters(), grads):
        assert rel_err(p.grad, want) <= 1e-9
    for p, want in zip(compiled.start.parameters(), start_grads):
        assert rel_err(p.grad, want) <= 1e-9


class SeedInStepWithTheLoop(nn.Module):
    """A forward-algorithm recursion: the state starts as ``start + x[0]`` and each step
    ends by adding ``x[t]``, so the seed's use falls in step with the loop's uses."""

    def __init__(self):
        super().__init__()
        self.start = nn.Parameter(torch.randn(H))
        self.transitions = nn.Parameter(torch.randn(H, H))

    def forward(self, x):
        alpha = self.start + x[0]
        for t in range(1, x.shape[0]):
            alpha = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, 1) + x[t]
        return torch.logsumexp(alpha, -1)


def test_a_seed_slice_in_step_with_the_loop_is_not_taken_for_a_step():
    torch.manual_seed(9)
    model = SeedInStepWithTheLoop().double()
    x = torch.randn(6, B, H, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", feedback=0.5, compiler="aot_eager")
    out = compiled(x)
    assert rel_err(out.detach(), model(x).detach()) <= 1e-12
    out.sum().backward()
    (loop,) = dsf_compile.report(compiled).loops
    assert loop.length == "5"
    alpha0 = model.start + x[0]
    step = lambda xt, a: (torch.logsumexp(a.unsqueeze(2) + model.transitions, 1) + xt,)
    _, (g_transitions,), _, (g_alpha0,) = dsf_reference_loop(
        step, [(x[t],) for t in range(1, 6)], (alpha0.detach(),), 0.5,
        lambda states: torch.logsumexp(states[-1][0], -1).sum(), [model.transitions])
    (g_start,) = torch.autograd.grad(alpha0, [model.start], g_alpha0)
    assert rel_err(compiled.transitions.grad, g_transitions) <= 1e-9
    assert rel_err(compiled.start.grad, g_start) <= 1e-9


class OppositeDirections(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)

    def forward(self, x, y):
        h = x.new_zeros(x.shape[1], H)
        T = x.shape[0]
        for t in range(T):
            h = self.cell(x[t] + y[T - 1 - t], h)
        return h


def test_inputs_read_in_opposite_directions_stay_exact():
    report = dsf_compile.explain(OppositeDirections(), torch.randn(5, B, IN), torch.randn(5, B, IN))
    assert report.loops == []
    assert any("forwards and another backwards" in item.reason for item in report.left_exact)


@pytest.mark.parametrize("layers", [1, 2])
def test_bptt_through_hoisted_hand_written_cells_is_exact(layers):
    """Exact mode runs the adjoint of the rolled step (its gradient-free part hoisted):
    every gradient must be BPTT's."""
    from dsf_compile.models import HandWrittenGRULM

    torch.manual_seed(9)
    reference = HandWrittenGRULM(30, 8, layers).double()
    model = dsf_compile.apply(copy.deepcopy(reference), "bptt", compiler="aot_eager")
    for shape in [(3, 9), (5, 9), (2, 4)]:  # new batch sizes and lengths recompile
        tokens = torch.randint(0, 30, shape)
        model.zero_grad()
        reference.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        reference(tokens).logsumexp(-1).mean().backward()
        assert len(dsf_compile.report(model).loops) == layers
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-9, name


def test_stacked_hand_written_layers_against_the_reference():
    """Two re-rolled loops where the second reads the first's states: layer by layer from
    the top, each loop's δ recursion gets the direct gradients of its states, including
    those that the next loop's step VJPs send back to its inputs."""
    from dsf_compile.models import HandWrittenGRULM

    torch.manual_seed(10)
    model = HandWrittenGRULM(30, 6, 2).double()
    tokens = torch.randint(0, 30, (3, 7))
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    compiled(tokens).logsumexp(-1).mean().backward()

    lam = torch.linspace(0, 1, 6, dtype=torch.float64)
    cell0, cell1 = model.cells
    emb = model.embedding.weight.detach().clone().requires_grad_()
    x = emb[tokens]
    h0 = torch.zeros(3, 6, dtype=torch.float64)
    T = tokens.shape[1]
    with torch.no_grad():
        y0 = torch.stack([h for h in _run(cell0, x.detach(), h0)], 1)
    y0_leaf = y0.clone().requires_grad_()
    head_params = list(model.head.parameters())

    def top_loss(states):
        y1 = torch.stack([s[0] for s in states], 1)
        return model.head(y0_leaf + y1).logsumexp(-1).mean()

    xs1 = [(y0[:, t],) for t in range(T)]
    _, grads1, x_grads1, _ = dsf_reference_loop(lambda xt, h: (cell1(xt, h),), xs1, (h0,), lam, top_loss,
                                                list(cell1.parameters()) + head_params + [y0_leaf])
    direct_y0 = grads1[-1] + torch.stack([g[0] for g in x_grads1], 1)
    xs0 = [(x.detach()[:, t],) for t in range(T)]
    bottom_loss = lambda states: (torch.stack([s[0] for s in states], 1) * direct_y0).sum()
    _, grads0, x_grads0, _ = dsf_reference_loop(lambda xt, h: (cell0(xt, h),), xs0, (h0,), lam, bottom_loss,
                                                list(cell0.parameters()))
    (g_emb,) = torch.autograd.grad(x, emb, torch.stack([g[0] for g in x_grads0], 1))

    for p, want in zip(compiled.cells[1].parameters(), grads1):
        assert rel_err(p.grad, want) <= 1e-9
    for p, want in zip(compiled.head.parameters(), grads1[len(list(cell1.parameters())):-1]):
        assert rel_err(p.grad, want) <= 1e-9
    for p, want in zip(compiled.cells[0].parameters(), grads0):
        assert rel_err(p.grad, want) <= 1e-9
    assert rel_err(compiled.embedding.weight.grad, g_emb) <= 1e-9


def _run(cell, x, h):
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        yield h


@pytest.mark.parametrize("cls,args", [
    (GRUCellLoop, lambda: (torch.randn(B, 5, IN), torch.randn(B, H))),
    (ReversedLSTMCellLoop, lambda: (torch.randn(5, B, IN), torch.randn(B, H), torch.randn(B, H))),
])
def test_fused_cell_ops_are_written_out_so_their_input_projection_is_hoisted(cls, args):
    from dsf_compile.passes.find_python_loops import find_python_loops
    from dsf_compile.step.hoist import hoist_step_inputs

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with dsf_compile.recurrent_ops_visible():
        torch.compile(cls(), backend=capture)(*args())
    (found,), _ = find_python_loops(graphs[0])
    hoisted = hoist_step_inputs(found.loop.body, 1, len(found.loop.carry_sizes))
    linears = lambda gm: [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert len(linears(hoisted.pre)) == 1 and len(linears(hoisted.rest)) == 1


@pytest.mark.parametrize("mode", ["dsf", "ft", "bptt"])
def test_hand_written_gru_blocks_train_like_nn_gru_blocks(mode):
    """The transformer-like model with nn.GRU layers (recurrent-op front end) and with the
    same GRU written by hand in a Python loop (re-rolling front end), same weights: the
    same outputs and gradients in every mode."""
    from dsf_compile.models import TransformerLikeRNN

    torch.manual_seed(12)
    with_op = TransformerLikeRNN(40, 8, 2, cell="gru").double()
    by_hand = TransformerLikeRNN(40, 8, 2, cell="gru-loop").double()
    renamed = {"weight_ih_l0": "cell.input.weight", "weight_hh_l0": "cell.hidden.weight",
               "bias_ih_l0": "cell.input.bias", "bias_hh_l0": "cell.hidden.bias"}

    def hand_name(name):
        prefix, _, last = name.rpartition(".")
        return f"{prefix}.{renamed[last]}" if last in renamed else name

    by_hand.load_state_dict({hand_name(n): v for n, v in with_op.state_dict().items()})
    tokens = torch.randint(0, 40, (3, 10))
    results = []
    for model, name_of in ((with_op, hand_name), (by_hand, lambda n: n)):
        compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
        out = compiled(tokens)
        out.logsumexp(-1).mean().backward()
        assert len(dsf_compile.report(compiled).loops) == 2
        results.append((out.detach(), {name_of(n): p.grad for n, p in compiled.named_parameters()}))
    assert rel_err(results[1][0], results[0][0]) <= 1e-12
    assert results[1][1].keys() == results[0][1].keys()
    for name, want in results[0][1].items():
        assert rel_err(results[1][1][name], want) <= 1e-9, name


class InPlaceStep(nn.Module):
    """A hand-written cell with an in-place op, in the ways people write them."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.wx, self.wh = nn.Linear(IN, H), nn.Linear(H, H, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        outs = []
        for t in range(x.shape[0]):
            g = self.wx(x[t])
            if self.style == "method":
                g.add_(self.wh(h))
            elif self.style == "augmented":
                g += self.wh(h)
            else:
                g = g + self.wh(h)
            if self.style == "inplace module":
                g = self.act(g)
            if self.style == "item assignment":
                g[:, 0] = 0.0
            h = 2 * torch.tanh(g)
            if self.style == "state":
                h.mul_(0.5)
            outs.append(h)
        return torch.stack(outs)


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
@pytest.mark.parametrize("style", ["method", "augmented", "inplace module", "item assignment", "state"])
def test_in_place_ops_in_the_step_leave_the_loop_exact_and_reported(style, mode):
    """Re-rolled from Dynamo's graph, an in-place op would be lost (the forward changed and
    a weight went without gradient): the loop stays exact, forward and gradients those of
    eager, and the report says why."""
    torch.manual_seed(6)
    report = assert_trains_exactly(InPlaceStep(style).double(), mode, torch.randn(5, B, IN, dtype=torch.float64))
    assert report.loops == [] and len(report.left_exact) == 1
    assert "in place" in report.left_exact[0].reason


class MaskedEmbeddingGRU(nn.Module):
    """Token ids looked up inside the loop and a padding mask that holds the state: the
    most common shape of a hand-written RNN over padded batches, in three slicing styles."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.embedding, self.cell = nn.Embedding(11, IN), nn.GRUCell(IN, H)

    def step(self, token, keep, h):
        return torch.where(keep, self.cell(self.embedding(token), h), h)

    def forward(self, tokens, mask):
        h = torch.zeros(tokens.shape[0], H, dtype=self.embedding.weight.dtype)
        outs = []
        for t in range(tokens.shape[1]):
            if self.style == "index":
                token, keep = tokens[:, t], mask[:, t, None]
            elif self.style == "unit slice":
                token, keep = tokens[:, t : t + 1].squeeze(1), mask[:, t : t + 1]
            else:
                token, keep = tokens.narrow(1, t, 1).squeeze(1), mask.narrow(1, t, 1)
            h = self.step(token, keep, h)
            outs.append(h)
        return torch.stack(outs, 1)


@pytest.mark.parametrize("mode", ["dsf", "ft", "bptt"])
@pytest.mark.parametrize("style", ["index", "unit slice", "narrow"])
def test_token_ids_and_padding_masks_are_per_step_inputs(style, mode):
    torch.manual_seed(8)
    model = MaskedEmbeddingGRU(style).double()
    tokens, mask = torch.randint(0, 11, (B, 6)), torch.rand(B, 6) > 0.3
    weights = torch.randn(B, 6, H, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    got = compiled(tokens, mask)
    (got * weights).sum().backward()
    assert rel_err(got.detach(), model(tokens, mask).detach()) <= 1e-12
    report = dsf_compile.report(compiled)
    assert len(report.loops) == 1 and not report.left_exact
    if mode == "bptt":
        (model(tokens, mask) * weights).sum().backward()
        want = [p.grad for p in model.parameters()]
    else:
        lam = torch.linspace(0, 1, H, dtype=torch.float64) if mode == "dsf" else torch.zeros(H, dtype=torch.float64)
        xs = [(tokens[:, t], mask[:, t, None]) for t in range(6)]
        loss = lambda states: sum((s[0] * weights[:, t]).sum() for t, s in enumerate(states))
        _, want, _, _ = dsf_reference_loop(lambda tok, keep, h: (model.step(tok, keep, h),), xs,
                                           (torch.zeros(B, H, dtype=torch.float64),), lam, loss,
                                           list(model.parameters()))
    for (name, p), w in zip(compiled.named_parameters(), want):
        assert rel_err(p.grad, w) <= 1e-9, name


class ColumnStateRNN(nn.Module):
    """A state kept as (features, batch), updated as ``h = W @ h + U @ x_t^T``."""

    def __init__(self):
        super().__init__()
        self.w, self.u = nn.Parameter(torch.randn(H, H) / 3), nn.Parameter(torch.randn(H, IN) / 3)

    def forward(self, x):
        h = x.new_zeros(H, x.shape[0])
        outs = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.w @ h + self.u @ x[:, t].T)
            outs.append(h)
        return torch.stack(outs)


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_a_state_laid_out_features_by_batch_stays_exact_and_reported(mode):
    torch.manual_seed(9)
    report = assert_trains_exactly(ColumnStateRNN().double(), mode, torch.randn(B, 6, IN, dtype=torch.float64))
    (item,) = report.left_exact
    assert "(features, batch)" in item.reason


class LSTMCellIdiom(nn.Module):
    """``h, c = cell(x_t, (h, c))`` with only h used after the loop: Dynamo drops the last
    step's unused ``c``, which made that step look different."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(IN, H)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], H)
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs)


def _trains_like_the_dsf_reference(model, T, step, init):
    """Apply dsf to a copy of ``model``, a loop over a ``(T, B, IN)`` input whose outputs
    are its first carry, and train it on a random linear loss: the forward must equal
    eager's, the report list one loop and nothing left exact, and the parameter gradients
    equal the literal reference's (linspace λ over the carries).  Returns that loop."""
    x = torch.randn(T, B, IN, dtype=torch.float64)
    weights = torch.randn(T, B, H, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    got = compiled(x)
    (got * weights).sum().backward()
    assert rel_err(got.detach(), model(x).detach()) <= 1e-12
    report = dsf_compile.report(compiled)
    assert len(report.loops) == 1 and report.left_exact == [], report
    loss = lambda states: sum((s[0] * weights[t]).sum() for t, s in enumerate(states))
    lam = torch.linspace(0, 1, sum(c.shape[-1] for c in init), dtype=torch.float64)
    _, want, _, _ = dsf_reference_loop(step, [(x[t],) for t in range(T)], init, lam, loss, list(model.parameters()))
    for (name, p), w in zip(compiled.named_parameters(), want):
        assert rel_err(p.grad, w) <= 1e-9, name
    return report.loops[0]


def test_lstm_cell_loop_whose_final_cell_state_is_unused_is_rewritten():
    torch.manual_seed(15)
    model = LSTMCellIdiom().double()
    zeros = torch.zeros(B, H, dtype=torch.float64)
    loop = _trains_like_the_dsf_reference(model, 6, lambda xt, h, c: model.cell(xt, (h, c)), (zeros, zeros))
    assert loop.carries == f"h[{H}], c[{H}]"


class SplitLoop(nn.Module):
    """Steps taken by ``x.split(1, dim)`` (each keeps its axis of size 1)."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.cell = dim, nn.GRUCell(IN, H)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        outs = []
        for piece in x.split(1, self.dim):
            h = self.cell(piece.squeeze(self.dim), h)
            outs.append(h)
        return torch.stack(outs)


class TimeFirstSplitLoop(nn.Module):
    """``x.split(1, -3)`` over a (T, B, F) input: time is the first axis, named from the end."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(IN, H)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        outs = []
        for piece in x.split(1, -3):
            h = self.cell(piece[0], h)
            outs.append(h)
        return torch.stack(outs)


def test_a_split_along_a_negative_time_axis_is_rewritten_against_the_reference():
    torch.manual_seed(17)
    model = TimeFirstSplitLoop().double()
    zeros = torch.zeros(B, H, dtype=torch.float64)
    _trains_like_the_dsf_reference(model, 5, lambda xt, h: (model.cell(xt, h),), (zeros,))


@pytest.mark.parametrize("dim", [1, -2])
def test_split_steps_are_one_slice_and_a_second_batch_size_is_still_rewritten(dim):
    """The stacked input of a split loop is a slice of x (no split pieces left behind for
    the next search to report as a loop it could not re-roll), and a second batch size,
    which Dynamo traces with a symbolic batch, is rewritten too."""
    torch.manual_seed(16)
    model = SplitLoop(dim).double()
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    for batch in (2, 3):
        x = torch.randn(batch, 5, IN, dtype=torch.float64)
        assert rel_err(compiled(x), model(x)) <= 1e-12
        report = dsf_compile.report(compiled)
        assert len(report.loops) == 1 and report.left_exact == [], report
    assert dsf_compile.report(compiled).loops[0].batch.startswith("s")  # symbolic: the second graph
