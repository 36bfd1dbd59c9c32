"""Properties that pin DSF down without the reference, dropout, shapes, and graph structure."""

import copy

import pytest
import torch
import torch.nn as nn

import dsf_compile

from .helpers import GRUCellLoop, assert_close, make_case, rel_err, run_compiled, run_eager
from .reference import dsf_reference


def test_diagonal_relu_rnn_dsf_equals_bptt():
    """W_hh diagonal, non-negative, every pre-activation positive: the Jacobian is exactly
    diag(W_hh), so DSF with that diagonal as λ is exact BPTT."""
    torch.manual_seed(0)
    T, B, n_in, H = 6, 3, 4, 5
    rnn = nn.RNN(n_in, H, nonlinearity="relu").double()
    with torch.no_grad():
        diag = torch.rand(H, dtype=torch.float64) * 0.9
        rnn.weight_hh_l0.copy_(torch.diag(diag))
        rnn.weight_ih_l0.uniform_(0.1, 1.0)
        rnn.bias_ih_l0.uniform_(0.1, 1.0)
        rnn.bias_hh_l0.uniform_(0.0, 0.5)
    x = torch.rand(T, B, n_in, dtype=torch.float64) + 0.1
    h0 = torch.rand(1, B, H, dtype=torch.float64)
    w = torch.randn(T, B, H, dtype=torch.float64)
    loss_fn = lambda out, h_n: (out * w).sum() + h_n.pow(2).sum()
    _, outputs, grads = run_compiled(rnn, x, h0, loss_fn, "dsf", feedback=diag)
    want_outputs, want = run_eager(rnn, x, h0, loss_fn)
    assert rel_err(outputs[0], want_outputs[0]) <= 1e-12
    assert_close(grads, want, 1e-9)
    # and that equality is a property of this model, not of the comparison
    _, _, ft_grads = run_compiled(rnn, x, h0, loss_fn, "ft")
    assert rel_err(ft_grads["weight_hh_l0"], want["weight_hh_l0"]) > 1e-3


def test_ft_equals_detached_previous_state():
    """λ = 0 is the same model with s_{t-1}.detach() fed to every step."""
    torch.manual_seed(1)
    cell = nn.GRUCell(3, 4).double()
    rnn = nn.GRU(3, 4).double()
    rnn.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w = torch.randn(5, 2, 4, dtype=torch.float64)
    loss_fn = lambda out, h_n: (out * w).sum()
    _, _, grads = run_compiled(rnn, x, None, loss_fn, "ft")
    h = torch.zeros(2, 4, dtype=torch.float64)
    outs = []
    for t in range(5):
        h = cell(x[t], h.detach())
        outs.append(h)
    loss_fn(torch.stack(outs), None).backward()
    assert_close({"weight_hh_l0": grads["weight_hh_l0"], "weight_ih_l0": grads["weight_ih_l0"]},
                 {"weight_hh_l0": cell.weight_hh.grad, "weight_ih_l0": cell.weight_ih.grad}, 1e-10)


def test_dsf_is_not_bptt_on_a_gru():
    """The rewrite really changes gradients where the Jacobian is not diagonal."""
    module, x, h0, loss_fn = make_case("gru", 2, False, False, True, True, torch.float64, seed=3)
    _, _, dsf = run_compiled(module, x, h0, loss_fn, "dsf")
    _, exact = run_eager(module, x, h0, loss_fn)
    assert rel_err(dsf["weight_hh_l0"], exact["weight_hh_l0"]) > 1e-4


def test_inter_layer_dropout_is_applied():
    """torch's decomposition drops it; we must not. dropout=1 zeroes layer 2's input."""
    for mode in ("dsf", "bptt"):
        module, x, h0, loss_fn = make_case("gru", 2, True, False, True, True, torch.float64, seed=5, dropout=1.0)
        module.train()
        _, outputs, grads = run_compiled(module, x, h0, loss_fn, mode)
        if mode == "bptt":
            want_outputs, want = run_eager(module, x, h0, loss_fn)
        else:
            D, T, B = 2, x.shape[0], x.shape[1]
            masks = [torch.zeros(T, B, D * module.hidden_size, dtype=torch.float64)]
            lams = [torch.linspace(0, 1, module.hidden_size, dtype=torch.float64)] * 4
            want_outputs, want = dsf_reference(module, x, h0, lams, loss_fn, dropout_masks=masks)
        for got, ref in zip(outputs, want_outputs):
            assert rel_err(got, ref) <= 1e-12
        assert_close(grads, want, 1e-9)


def test_partial_dropout_changes_training_outputs_only():
    module = nn.GRU(4, 8, 2, dropout=0.5).double()
    model = dsf_compile.apply(module, compiler="aot_eager")
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    model.eval()
    ref = nn.GRU(4, 8, 2).double()
    ref.load_state_dict(module.state_dict())
    assert rel_err(model(x)[0], ref(x)[0]) <= 1e-12
    model.train()
    assert rel_err(model(x)[0], ref(x)[0]) > 1e-3


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_new_sequence_length_and_batch_size(kind):
    """A second and third call with other T and B recompile (dynamic shapes) and stay right."""
    module, _, _, _ = make_case(kind, 2, True, False, True, False, torch.float64, seed=9)
    model = dsf_compile.apply(module, compiler="aot_eager")
    for T, B in [(5, 2), (8, 3), (1, 4), (3, 1)]:
        x = torch.randn(T, B, module.input_size, dtype=torch.float64, requires_grad=True)
        out, _ = model(x)
        w = torch.randn_like(out)
        (out * w).sum().backward()
        lam = torch.linspace(0, 1, module.hidden_size * (2 if kind == "lstm" else 1), dtype=torch.float64)
        _, want = dsf_reference(module, x.detach(), None, [lam] * 4, lambda o, *_, w=w: (o * w).sum())
        got = {n: p.grad for n, p in model.named_parameters()}
        got["x"] = x.grad
        want.pop("h0"), want.pop("c0", None)
        assert_close(got, want, 1e-9)
        module.zero_grad()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_one_graph_serves_every_later_sequence_length(kind):
    """The fused op is traced opaquely, so the length is not a constant of the graph: the
    first call compiles for its shapes (static kernels, the fastest for fixed-length
    training), the second length compiles once more with T dynamic, and every later
    length reuses that graph (DSF gradients against the reference each time)."""
    torch._dynamo.reset()
    module, _, _, _ = make_case(kind, 2, False, False, True, False, torch.float64, seed=4)
    model = dsf_compile.apply(module, compiler="aot_eager")
    lam = torch.linspace(0, 1, module.hidden_size * (2 if kind == "lstm" else 1), dtype=torch.float64)
    for T in (4, 6, 9, 13, 20):
        x = torch.randn(T, 3, module.input_size, dtype=torch.float64, requires_grad=True)
        out, _ = model(x)
        (out ** 2).sum().backward()
        _, want = dsf_reference(module, x.detach(), None, [lam] * 2, lambda o, *_: (o ** 2).sum())
        got = {n: p.grad for n, p in model.named_parameters()}
        got["x"] = x.grad
        want.pop("h0"), want.pop("c0", None)
        assert_close(got, want, 1e-9)
        module.zero_grad()
    assert len(model._dsf_backend.graphs) == 4  # a forward and a backward graph, twice
    assert not dsf_compile.report(model).loops[-1].length.isdigit()  # a symbolic size


def test_state_dict_keys_and_identity_unchanged():
    module = nn.LSTM(3, 4, 2)
    keys = list(module.state_dict())
    assert dsf_compile.apply(module, compiler="aot_eager") is module
    module(torch.randn(2, 1, 3))
    assert list(module.state_dict()) == keys
    assert [n for n, _ in module.named_parameters()] == keys


def _graphs_of_bidirectional_gru(T: int, mode: str) -> dict:
    torch._dynamo.reset()
    module = nn.GRU(4, 5, 2, bidirectional=True).double()
    model = dsf_compile.apply(module, mode=mode, compiler="aot_eager", dynamic=False)
    out, h = model(torch.randn(T, 3, 4, dtype=torch.float64, requires_grad=True))
    (out.sum() + h.sum()).backward()
    assert len(model._dsf_backend.graphs) == 2
    return dict(model._dsf_backend.graphs)


def _count(graph, names):
    return sum(1 for n in graph.graph.nodes if n.op == "call_function" and any(s in str(n.target) for s in names))


MATMULS = ["aten.mm", "aten.addmm", "aten.bmm"]


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_backward_graph_has_one_node_per_loop_and_no_per_step_matmuls(mode):
    """Each rewritten loop adds one node to the backward graph, whatever T: the reverse
    scan (DSF), or exact BPTT's backward run as one kernel (bptt); the number of matrix
    products in the graph does not grow with T.  The forward is the fused recurrence
    alone: the batched step lives in the backward."""
    short, long = (_graphs_of_bidirectional_gru(T, mode) for T in (3, 12))
    for graphs in (short, long):
        assert _count(graphs["forward"], ["dsf.loop_states"]) == 4
        assert _count(graphs["forward"], MATMULS) == 0
    per_loop = "dsf.reverse_linear_scan" if mode == "dsf" else "dsf.exact_backward"
    others = ["dsf.loop_states", "dsf.exact_backward" if mode == "dsf" else "dsf.reverse_linear_scan"]
    for graphs in (short, long):
        assert _count(graphs["backward"], [per_loop]) == 4
        assert _count(graphs["backward"], others) == 0
    assert _count(long["backward"], MATMULS) == _count(short["backward"], MATMULS)
    if mode == "dsf":  # (exact mode's batched VJP runs inside its node)
        assert _count(short["backward"], MATMULS) > 0


def _backward_matmuls(mode: str, T: int) -> int:
    """Matrix products run by the backward of one applied nn.GRU layer (inside the
    rewrites' own kernels too), read off the profiler at the second call (the first
    traces the step's adjoint for these shapes).  Only the innermost calls count: under
    ``vmap`` the profiler also records each op at its per-example shapes, around the
    batched call that runs."""
    torch.manual_seed(0)
    model = dsf_compile.apply(nn.GRU(4, 6).double(), mode=mode, compiler="aot_eager", dynamic=False)
    x = torch.randn(T, 3, 4, dtype=torch.float64, requires_grad=True)
    model(x)[0].pow(2).sum().backward()
    loss = model(x)[0].pow(2).sum()
    with torch.profiler.profile() as profile:
        loss.backward()
    names = ("aten::mm", "aten::addmm", "aten::bmm")

    def inner_matmuls(event) -> int:
        below = sum(inner_matmuls(child) for child in event.cpu_children)
        return below or int(event.name in names)

    return sum(inner_matmuls(event) for event in profile.events() if event.cpu_parent is None)


def test_backward_matmul_counts():
    """DSF's backward reuses the forward's products with the weights: it runs only the
    three gradient GEMMs over T·B rows (the input's, W_ih's and W_hh's), whatever T.
    Exact mode's recomputes the step's forward once (its two products), shared by the
    adjoint loop and the same batched VJP, plus the adjoint loop's one product with the
    recurrent weights per step: the recomputation is not done twice."""
    for T in (4, 9):
        assert _backward_matmuls("dsf", T) == 3
        assert _backward_matmuls("bptt", T) == 2 + 3 + T


def test_past_dynamos_recompile_limit_calls_run_eagerly_and_say_so(monkeypatch, recwarn):
    """Each new length of a Python loop is a new graph; past Dynamo's limit it would run the
    forward eagerly without a word (exact gradients, the report still saying dsf).  Here
    such a call runs eagerly with a warning and a line in the report; lengths that already
    have a graph keep theirs."""
    monkeypatch.setattr(dsf_compile, "RECOMPILE_LIMIT", 2)
    torch.manual_seed(7)
    model = GRUCellLoop().double()
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
    inputs = {T: torch.randn(T, 2, 3, dtype=torch.float64) for T in (3, 4, 5)}
    for T in (3, 4):
        compiled(inputs[T])
    assert dsf_compile.report(compiled).eager_calls == []
    with pytest.warns(UserWarning, match="runs eagerly with exact gradients: Dynamo's recompile limit"):
        got = compiled(inputs[5])
    (got ** 2).sum().backward()
    want = model(inputs[5])
    (want ** 2).sum().backward()
    assert rel_err(got.detach(), want.detach()) <= 1e-12
    assert_close({n: p.grad for n, p in compiled.named_parameters()},
                 {n: p.grad for n, p in model.named_parameters()}, 1e-12)
    report = dsf_compile.report(compiled)
    assert len(report.eager_calls) == 1 and "recompile limit (2 graphs" in report.eager_calls[0]
    assert "calls run eagerly" in str(report)
    recwarn.clear()
    compiled(inputs[3])  # its graph is still used: nothing new to say
    assert not [w for w in recwarn if "eagerly" in str(w.message)]
    assert len(dsf_compile.report(compiled).eager_calls) == 1


class _TwoLayerGRU(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.gru = nn.GRU(3, 4, 2, dropout=dropout)

    def forward(self, x):
        return self.gru(x)[0]


def test_models_of_one_class_with_different_dropout_rates():
    """A sweep builds the class again with another rate: Dynamo would make the rate a
    graph input (a symbolic float the rewrite cannot read) and every later model crashed."""
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for rate in (0.1, 0.2, 0.3):
        torch.manual_seed(12)
        model = _TwoLayerGRU(rate).double()
        compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager")
        first, second = compiled(x), compiled(x)
        (first.sum() + second.sum()).backward()
        assert not torch.equal(first, second)  # the inter-layer dropout is drawn in training
        assert len(dsf_compile.report(compiled).loops) == 2
        compiled.eval(), model.eval()
        assert rel_err(compiled(x), model(x)) <= 1e-12


def test_torch_save_and_load_of_an_applied_model(tmp_path):
    """The loaded model compiles its methods again with the same mode and λ: same outputs,
    same gradients, its own report."""
    torch.manual_seed(14)
    model = dsf_compile.apply(_TwoLayerGRU(0.0).double(), "ft", compiler="aot_eager")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    model(x).sum().backward()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert dsf_compile.report(loaded).loops == []  # nothing run yet
    for m in (model, loaded):
        m.zero_grad()
        (m(x) ** 2).sum().backward()
    for (name, p), q in zip(loaded.named_parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12, name
    assert [r.rewrite for r in dsf_compile.report(loaded).loops] == ["ft (λ = 0)"] * 2
