"""End to end through Inductor code generation (slow on 2 cores: a small set)."""

import copy

import pytest
import torch
import torch.nn as nn

import dsf_compile
from dsf_compile import kernels
from dsf_compile.models.lm import RNNLanguageModel, masked_cross_entropy

from .helpers import assert_close, make_case, rel_err, run_compiled


@pytest.fixture(autouse=True)
def no_stale_inductor_cache():
    with torch.compiler.config.patch(force_disable_caches=True):
        yield


@pytest.mark.parametrize("kind,mode,options", [
    ("gru", "dsf", {}), ("lstm", "ft", {}), ("rnn_tanh", "bptt", {}),
    ("lstm", "highway", {"iterations": 2}), ("gru", "dsf", {"feedback": "adaptive"}),
    ("gru", "tbptt", {"window": 2}), ("lstm", "auto", {"every": 1}),
])
def test_inductor_matches_aot_eager(kind, mode, options, monkeypatch):
    monkeypatch.setattr(kernels.cpu, "_WRITING_STEPS", {})
    module, x, h0, loss_fn = make_case(kind, 2, True, True, True, True, torch.float32, seed=21)
    torch.manual_seed(0)  # the same Hutchinson probes for adaptive λ, drawn as eager draws them
    _, want_out, want = run_compiled(module, x, h0, loss_fn, mode, compiler="aot_eager", **options)
    torch.manual_seed(0)
    with torch._inductor.config.patch(fallback_random=True):
        model, got_out, got = run_compiled(module, x, h0, loss_fn, mode, compiler="inductor", **options)
    for a, b in zip(got_out, want_out):
        assert rel_err(a, b) <= 1e-5
    assert_close(got, want, 1e-4)
    kinds = [k for k, _ in model._dsf_backend.graphs]
    assert kinds.count("forward") == 1 and kinds.count("backward") == 1
    # steps that ran compiled by Inductor on the CPU: exact mode's adjoint loop; under a
    # diagonal feedback, the forward that keeps the products for the backward
    compiled = {key.split(":")[0] for key, _ in kernels.cpu._WRITING_STEPS}
    assert compiled == {"bptt": {"adjoint"}, "highway": set(), "auto": {"adjoint"}}.get(mode, {"products"})


def test_language_model_trains_with_inductor():
    torch.manual_seed(0)
    model = dsf_compile.apply(RNNLanguageModel(50, 16, 2), "dsf")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(1, 50, (4, 13))
    losses = []
    for _ in range(15):
        loss = masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], pad=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    report = dsf_compile.report(model)
    # T is a size of the input, traced as a symbol (or 12), the same for both layers
    assert len(report.loops) == 2 and len({r.length for r in report.loops}) == 1
    assert all("models/lm.py:" in r.source for r in report.loops), report  # where the model calls the GRU
    assert isinstance(model.layers[0], nn.GRU)


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_hand_written_cell_lm_through_inductor_matches_aot_eager(mode):
    """Re-rolled Python loops (two layers) compiled by Inductor: same gradients as the
    AOTAutograd-only path, which the literal-reference tests cover (in bptt the adjoint
    loop's step is compiled on the CPU too)."""
    from dsf_compile.models import HandWrittenGRULM

    torch.manual_seed(0)
    reference = HandWrittenGRULM(30, 8, 2).double()
    tokens = torch.randint(0, 30, (3, 9))
    grads = {}
    for compiler in ("aot_eager", "inductor"):
        model = dsf_compile.apply(copy.deepcopy(reference), mode, compiler=compiler)
        model(tokens).logsumexp(-1).mean().backward()
        assert len(dsf_compile.report(model).loops) == 2
        grads[compiler] = {n: p.grad for n, p in model.named_parameters()}
    assert_close(grads["inductor"], grads["aot_eager"], 1e-9)
