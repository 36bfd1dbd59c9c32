"""Forward kernels of re-rolled loops: the rolled loop over a registered step body."""

import copy

import pytest
import torch

import dsf_compile
from dsf_compile import kernels
from dsf_compile.cells import run_cell_layer, trace_step
from dsf_compile.loop_ir import LoopIR
from dsf_compile.models import HandWrittenGRULM

from .helpers import assert_close, rel_err


def _gru_body(T=7, B=3, D=5, H=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(T * 100 + B)
    key = kernels.register_body(LoopIR("gru", trace_step("gru", True), ("h",), (H,), 1, 4, False, "test", "test"))
    x = torch.randn(T, B, D, dtype=dtype, generator=gen)
    h0 = torch.randn(B, H, dtype=dtype, generator=gen)
    weights = [torch.randn(s, dtype=dtype, generator=gen) for s in [(3 * H, D), (3 * H, H), (3 * H,), (3 * H,)]]
    return key, x, h0, weights


def test_rolled_loop_over_the_compiled_step_matches_torch_gru():
    """The Inductor-compiled recurrent part (what CUDA graphs replay) and the eager one
    compute torch.gru's states."""
    key, x, h0, weights = _gru_body()
    body = kernels._BODIES[key]
    with torch.no_grad():
        want = run_cell_layer("gru", x, [h0], weights)[0]
        eager = kernels.stepped_states(body, body.rest, [x], [h0], weights)[0]
        step = kernels.compiled_step(key, kernels.step_inputs_of(body, [x], [h0], weights))
        compiled = kernels.stepped_states(body, step, [x], [h0], weights)[0]
        again = kernels.compiled_step(key, kernels.step_inputs_of(body, [x], [h0], weights))
    assert again is step
    assert rel_err(eager, want) <= 1e-12 and rel_err(compiled, want) <= 1e-12


def test_rolled_loop_runs_backwards_in_place():
    """A reverse-time loop steps from the last input to the first, reading them in place:
    the states of torch.gru run over the flipped sequence, flipped back."""
    key, x, h0, weights = _gru_body(T=6)
    body = kernels._BODIES[key]
    with torch.no_grad():
        want = run_cell_layer("gru", x.flip(0), [h0], weights)[0].flip(0)
        got = kernels.stepped_states(body, body.rest, [x], [h0], weights, reverse=True)[0]
        through_kernel = kernels.run_kernel(key, True, [x], [h0], weights)[0]
    assert rel_err(got, want) <= 1e-12 and rel_err(through_kernel, want) <= 1e-12
    assert rel_err(got, kernels.stepped_states(body, body.rest, [x], [h0], weights)[0]) > 1e-3


def test_compiled_step_inside_an_applied_model(monkeypatch):
    """The step compiled at run time, from inside the forward op of an applied model (as on
    CUDA), gives the eager loop's values and gradients."""

    def compiled_loop(key, x_steps, carries, invariants, reverse):
        body = kernels._BODIES[key]
        step = kernels.compiled_step(key, kernels.step_inputs_of(body, x_steps, carries, invariants))
        return kernels.stepped_states(body, step, x_steps, carries, invariants, reverse)

    torch.manual_seed(3)
    reference = HandWrittenGRULM(20, 6, 2).double()
    tokens = torch.randint(0, 20, (2, 8))
    results = []
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(kernels.run, "_run_body", compiled_loop)
        model = dsf_compile.apply(copy.deepcopy(reference), "dsf", compiler="aot_eager")
        out = model(tokens)
        out.logsumexp(-1).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
        torch._dynamo.reset()
    assert rel_err(results[1][0], results[0][0]) <= 1e-12
    assert_close(results[1][1], results[0][1], 1e-12)


def test_bodies_are_named_by_their_computation_not_their_value_names(monkeypatch):
    """Layers that run the same step (their carries named ``prev_h`` and ``prev_h_16`` by
    the front end) share one kernel, so on CUDA one compiled step and one CUDA graph serve
    them all; a different computation gets another name.  (The step that also returns its
    products for the backward is a kernel of its own, shared the same way.)"""
    def loop(body):
        return LoopIR("gru", body, ("h",), (4,), 1, 4, False, "test", "test")

    first, renamed = trace_step("gru", True), trace_step("gru", True)
    for node in renamed.graph.nodes:
        if node.op == "placeholder":
            node.name = node.target = f"{node.name}_16"
    renamed.recompile()
    assert renamed.code != first.code
    assert kernels.register_body(loop(first)) == kernels.register_body(loop(renamed))
    assert kernels.register_body(loop(trace_step("rnn_tanh", True))) != kernels.register_body(loop(first))
    torch.manual_seed(4)
    model = dsf_compile.apply(HandWrittenGRULM(30, 8, 3).double(), "dsf", compiler="aot_eager")
    kept = dict(kernels._BODIES)  # every module of the registry reads this one dict
    kernels._BODIES.clear()
    try:
        model(torch.randint(0, 30, (2, 5))).sum().backward()
        assert sorted(key.split(":")[0] for key in kernels._BODIES) == ["body", "products"]
    finally:
        kernels._BODIES.update(kept)
    assert len(dsf_compile.report(model).loops) == 3


def _unrolled(body, xs, init, invariants, reverse):
    states, carries = [], list(init)
    for t in (range(len(xs) - 1, -1, -1) if reverse else range(len(xs))):
        carries = list(body(xs[t], *carries, *invariants))
        states.append(carries)
    if reverse:
        states = states[::-1]
    return [torch.stack([s[i] for s in states]) for i in range(len(init))]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["shared", "moved"])
def test_exact_gradients_against_autograd_through_the_unrolled_loop(kind, reverse):
    """Exact BPTT's gradients (initial carries, step inputs, weights) from the adjoint loop
    and the batched VJP, against autograd through the loop unrolled.  ``shared``: a step
    whose per-step part recomputes its new states, which then serve the VJP; ``moved``: a
    step whose new states are values moved from its inputs, with no per-step work to
    share (the VJP's forward then runs on its own)."""
    gen = torch.Generator().manual_seed(5)
    T, B, H = 6, 3, 4

    def shared(x, a, b, w):
        return torch.tanh(x + b @ w), a * torch.sigmoid(x) + b

    def moved(x, a, b, w):
        return b, a

    body = torch.fx.symbolic_trace(shared if kind == "shared" else moved)
    loop = LoopIR(kind, body, ("a", "b"), (H, H), 1, 1, reverse, "test", "test")
    key = kernels.register_adjoint(loop)
    xs = torch.randn(T, B, H, dtype=torch.float64, generator=gen, requires_grad=True)
    init = [torch.randn(B, H, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2)]
    w = torch.randn(H, H, dtype=torch.float64, generator=gen, requires_grad=True)
    states = _unrolled(body, xs, init, [w], reverse)
    direct = [torch.randn(T, B, H, dtype=torch.float64, generator=gen) for _ in range(2)]
    want = torch.autograd.grad(states, [*init, xs, w], direct, allow_unused=True, materialize_grads=True)
    previous = [torch.cat([s[1:], c[None]]) if reverse else torch.cat([c[None], s[:-1]])
                for s, c in zip(states, init)]
    got = dsf_compile.ops.exact_backward(key, reverse, [xs.detach()], [p.detach() for p in previous], direct,
                                         [c.detach() for c in init], [w.detach()])
    assert len(got) == len(want) == 4
    for g, expected in zip(got, want):
        assert rel_err(g, expected) <= 1e-12
    name = next(n for n in kernels._ADJOINT_PARTS if n.startswith(key))
    assert (kernels._ADJOINT_PARTS[name].state_slots is None) == (kind == "moved")
