"""nn.RNN/GRU/LSTM on packed sequences, trained with the rule through ``apply``: forward
equal to eager's, exact BPTT equal to eager autograd, DSF and FT equal to the literal
reference run on each sequence alone (each row's δ over its own length, the final state's
gradient entering at its last real step), Highway-BP with T − 1 refinements exact."""

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import dsf_compile

from .helpers import MODULES, rel_err
from .reference import dsf_reference

D = torch.float64
LAM = 0.6


class PackedTagger(nn.Module):
    """Padded rows and their lengths in, packed through the recurrent module, padded out."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, dropout: float = 0.0):
        super().__init__()
        self.rnn = MODULES[kind](3, 4, layers, bidirectional=bidirectional, dropout=dropout)

    def forward(self, x, lengths, h0=None, enforce_sorted: bool = False):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out, hidden = self.rnn(packed, h0)
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        return out, hidden


def _case(kind, layers, bidirectional, seed, sorted_rows=False):
    g = torch.Generator().manual_seed(seed)
    T, B = 6, 4
    lengths = torch.tensor([6, 3, 5, 1]) if not sorted_rows else torch.tensor([6, 5, 3, 1])
    D_ = 2 if bidirectional else 1
    x = torch.randn(T, B, 3, generator=g, dtype=D)
    h0 = torch.randn(layers * D_, B, 4, generator=g, dtype=D)
    if kind == "lstm":
        h0 = (h0, torch.randn(layers * D_, B, 4, generator=g, dtype=D))
    w_out = torch.randn(T, B, D_ * 4, generator=g, dtype=D)
    w_h = torch.randn(layers * D_, B, 4, generator=g, dtype=D)
    return x, lengths, h0, w_out, w_h


def _loss(out, hidden, w_out, w_h):
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    return (out * w_out).sum() + sum((s * w_h).sum() for s in states)


def _leaf(h0):
    return tuple(h.clone().requires_grad_() for h in h0) if isinstance(h0, tuple) else h0.clone().requires_grad_()


def _train(model, x, lengths, h0, w_out, w_h, sorted_rows):
    x, h0 = x.clone().requires_grad_(), _leaf(h0)
    out, hidden = model(x, lengths, h0, enforce_sorted=sorted_rows)
    _loss(out, hidden, w_out, w_h).backward()
    starts = h0 if isinstance(h0, tuple) else (h0,)
    grads = {name: p.grad for name, p in model.rnn.named_parameters()}
    grads.update(x=x.grad, **{f"s{i}": s.grad for i, s in enumerate(starts)})
    return out.detach(), grads


CASES = [("gru", 2, True, 0, False), ("lstm", 1, True, 1, True), ("rnn_tanh", 3, False, 2, False),
         ("lstm", 2, False, 3, False)]


@pytest.mark.parametrize("kind,layers,bidirectional,seed,sorted_rows", CASES)
def test_exact_bptt_on_packed_sequences_is_eager_autograd(kind, layers, bidirectional, seed, sorted_rows):
    torch.manual_seed(seed)
    model = PackedTagger(kind, layers, bidirectional).double()
    case = _case(kind, layers, bidirectional, seed, sorted_rows)
    want_out, want = _train(copy.deepcopy(model), *case, sorted_rows)
    compiled = dsf_compile.apply(copy.deepcopy(model), "bptt", compiler="aot_eager")
    got_out, got = _train(compiled, *case, sorted_rows)
    assert rel_err(got_out, want_out) <= 1e-12
    for name, w in want.items():
        assert rel_err(got[name], w) <= 1e-11, name
    report = dsf_compile.report(compiled)
    assert len(report.loops) == layers * (2 if bidirectional else 1) and not report.left_exact
    assert not report.eager_calls and all("packed" in loop.name for loop in report.loops)


def _per_sequence_reference(model, x, lengths, h0, w_out, w_h, lam):
    """The literal DSF reference (tests/reference.py) run on each row alone, its gradients
    summed: the loss is a sum over rows."""
    module = model.rnn
    total = None
    for b, length in enumerate(lengths.tolist()):
        starts = h0 if isinstance(h0, tuple) else (h0,)
        row_h0 = tuple(s[:, b : b + 1] for s in starts)
        loops = module.num_layers * (2 if module.bidirectional else 1)
        lams = [torch.full((len(starts) * 4,), lam, dtype=D)] * loops

        def loss(out, *hidden, b=b, length=length):
            return (out * w_out[:length, b : b + 1]).sum() + sum((h * w_h[:, b : b + 1]).sum() for h in hidden)

        _, grads = dsf_reference(module, x[:length, b : b + 1], row_h0 if len(row_h0) > 1 else row_h0[0], lams, loss)
        grads["x"] = torch.cat([grads["x"], x.new_zeros(x.shape[0] - length, 1, x.shape[2])])
        grads.update({f"s{i}": grads.pop(name) for i, name in enumerate(("h0", "c0")[: len(starts)])})
        if total is None:
            total = {k: [v] for k, v in grads.items()}
        else:
            for k, v in grads.items():
                total[k].append(v)
    return {k: (torch.cat(v, 1) if k in ("x", "s0", "s1") else sum(v)) for k, v in total.items()}


@pytest.mark.parametrize("mode,lam", [("dsf", LAM), ("ft", 0.0)])
@pytest.mark.parametrize("kind,layers,bidirectional,seed,sorted_rows", CASES)
def test_dsf_on_packed_sequences_is_the_literal_reference_on_each_sequence(mode, lam, kind, layers, bidirectional,
                                                                         seed, sorted_rows):
    torch.manual_seed(seed)
    model = PackedTagger(kind, layers, bidirectional).double()
    case = _case(kind, layers, bidirectional, seed, sorted_rows)
    want_out, eager = _train(copy.deepcopy(model), *case, sorted_rows)
    options = {"feedback": lam} if mode == "dsf" else {}
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager", **options)
    got_out, got = _train(compiled, *case, sorted_rows)
    assert rel_err(got_out, want_out) <= 1e-12
    want = _per_sequence_reference(model, *case, lam)
    for name, w in want.items():
        assert rel_err(got[name], w) <= 1e-10, name
    assert rel_err(got["weight_hh_l0"], eager["weight_hh_l0"]) > 1e-4  # and not BPTT


def test_highway_with_t_minus_one_refinements_on_packed_sequences_is_exact():
    torch.manual_seed(5)
    model = PackedTagger("gru", 2, True).double()
    case = _case("gru", 2, True, 5)
    _, want = _train(copy.deepcopy(model), *case, False)
    compiled = dsf_compile.apply(copy.deepcopy(model), "highway", iterations=5, compiler="aot_eager")
    _, got = _train(compiled, *case, False)
    for name, w in want.items():
        assert rel_err(got[name], w) <= 1e-10, name


def test_inter_layer_dropout_is_drawn_as_torchs_packed_op_draws_it():
    torch.manual_seed(0)
    model = PackedTagger("lstm", 3, False, dropout=0.4).double()
    case = _case("lstm", 3, False, 0)
    torch.manual_seed(7)
    want_out, want = _train(copy.deepcopy(model), *case, False)
    compiled = dsf_compile.apply(copy.deepcopy(model), "bptt", compiler="aot_eager")
    torch.manual_seed(7)
    got_out, got = _train(compiled, *case, False)
    assert rel_err(got_out, want_out) <= 1e-12
    for name, w in want.items():
        assert rel_err(got[name], w) <= 1e-11, name


def test_packed_calls_without_gradients_run_torchs_op_and_an_applied_module():
    torch.manual_seed(0)
    model = PackedTagger("gru", 1, False).double()
    x, lengths, h0, *_ = _case("gru", 1, False, 0)
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = compiled(x, lengths, h0)
    assert not [w for w in caught if "dsf_compile" in str(w.message)]  # a call that trains nothing says nothing
    assert rel_err(out, model(x, lengths, h0)[0]) <= 1e-12 and not dsf_compile.report(compiled).loops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x, lengths, h0)[0].sum().backward()
    assert not [w for w in caught if "dsf_compile" in str(w.message)]  # the first that trains: its loop rewritten
    assert len(dsf_compile.report(compiled).loops) == 1
    gru = dsf_compile.apply(copy.deepcopy(model.rnn), compiler="aot_eager")
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, hidden = gru(packed)
    (pad_packed_sequence(out)[0].sum() + hidden.sum()).backward()
    (loop,) = dsf_compile.report(gru).loops
    lines, first = inspect.getsourcelines(test_packed_calls_without_gradients_run_torchs_op_and_an_applied_module)
    called = first + next(i for i, line in enumerate(lines) if "out, hidden = gru(packed)" in line)
    assert loop.name == "nn.GRU '' (packed sequence) layer 0" and loop.source.endswith(f"test_packed.py:{called}")
