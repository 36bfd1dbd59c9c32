"""The step's products with its weights, kept by the forward and reused by the backward.

Checked against the body as it is: the kept products are the values the step computes,
the states are unchanged, and the VJP of the body reading them (batched over time, as the
diagonal feedbacks take it) equals the VJP of the body recomputing them, in float64, for
the step's inputs, weights and consumed states alike.
"""

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from dsf_compile import kernels
from dsf_compile.cells import trace_step
from dsf_compile.loop_ir import LoopIR
from dsf_compile.step.products import find_products, forward_body, reuse_product

from .helpers import assert_close, rel_err


def many_products(x, h, w_in, w_rec, w_gate, b_gate, v, w_lin):
    """One of each product form: mm, @, addmm, a method, linear without bias, a product
    with a vector (recomputed, not reused), one whose weight is itself computed from a
    weight, and one with no invariant operand (not a weight product)."""
    drive = torch.mm(x, w_in) + h @ (w_rec * 0.5)
    gate = torch.sigmoid(torch.addmm(b_gate, h, w_gate))
    lin = F.linear(h.tanh(), w_lin)
    scale = torch.matmul(h, v).unsqueeze(-1)
    mixed = h.mm(w_rec.t()) + (x @ x.t()) @ h
    return (gate * torch.tanh(drive + lin) + (1 - gate) * h * torch.sigmoid(scale) + 0.1 * mixed,)


def linear_recurrence(x, h, a):
    """A state that is a product itself."""
    return (h @ a + x,)


def _many_products_case(T, B, D, H, gen):
    shapes = [(D, H), (H, H), (H, H), (H,), (H,), (H, H)]
    return torch.fx.symbolic_trace(many_products), 1, [(B, D)], [H], shapes


def _linear_case(T, B, D, H, gen):
    return torch.fx.symbolic_trace(linear_recurrence), 1, [(B, H)], [H], [(H, H)]


def _cell_case(kind, bias):
    def case(T, B, D, H, gen):
        gates = {"gru": 3, "lstm": 4}.get(kind, 1)
        shapes = [(gates * H, D), (gates * H, H)] + ([(gates * H,), (gates * H,)] if bias else [])
        carries = [H, H] if kind == "lstm" else [H]
        return trace_step(kind, bias), 1, [(B, D)], carries, shapes
    return case


CASES = {
    "gru": _cell_case("gru", True),
    "gru-no-bias": _cell_case("gru", False),
    "lstm": _cell_case("lstm", True),
    "rnn_tanh": _cell_case("rnn_tanh", True),
    "many-products": _many_products_case,
    "linear-recurrence": _linear_case,
}
EXPECTED_PRODUCTS = {"gru": 2, "gru-no-bias": 2, "lstm": 2, "rnn_tanh": 2, "many-products": 6,
                     "linear-recurrence": 1}


def _case(name, seed):
    gen = torch.Generator().manual_seed(seed)
    T, B, D, H = (int(v) for v in torch.randint(2, 7, (4,), generator=gen))
    body, n_x, x_shapes, carry_sizes, w_shapes = CASES[name](T, B, D, H, gen)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen) * 0.5  # noqa: E731
    xs = [randn(T, *s) for s in x_shapes]
    init = [randn(B, c) for c in carry_sizes]
    weights = [randn(*s) for s in w_shapes]
    loop = LoopIR(name, body, tuple(f"c{i}" for i in range(len(init))), tuple(carry_sizes), n_x, len(weights),
                  False, "test", "test")
    return loop, xs, init, weights


def _unrolled(body, xs, init, weights, reverse=False):
    """Every output of ``body`` at every step, stepping it as written."""
    outputs, carries = [], list(init)
    for t in range(len(xs[0]) - 1, -1, -1) if reverse else range(len(xs[0])):
        values = body(*(x[t] for x in xs), *carries, *weights)
        carries = list(values[: len(init)])
        outputs.append(values)
    if reverse:
        outputs = outputs[::-1]
    return [torch.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))]


@pytest.mark.parametrize("name", list(CASES))
def test_products_found(name):
    loop, *_ = _case(name, 0)
    assert len(find_products(loop.body, loop.num_step_inputs, len(loop.carry_sizes))) == EXPECTED_PRODUCTS[name]


COMPILED = ["gru", "lstm", "many-products", "linear-recurrence"]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name,compiled", [(n, False) for n in CASES] + [(n, True) for n in COMPILED])
def test_kept_products_are_the_steps_values(name, compiled, reverse):
    """The kernel's states are the loop's; each product it returns is what the step
    computes at that step, whether it is done before the loop (an input projection) or
    inside it; stepped op by op, or (``compiled``) by Inductor's step writing each step's
    outputs into the buffers of all T."""
    loop, xs, init, weights = _case(name, 1)
    loop.reverse = reverse
    saved = kernels.register_products(loop, compile_step=compiled)
    products = find_products(loop.body, loop.num_step_inputs, len(init))
    with torch.no_grad():
        got = kernels.run_kernel(saved.kernel, reverse, xs, init, weights)
        want = _unrolled(forward_body(loop.body, products), xs, init, weights, reverse)
    assert len(got) == len(init) + saved.count == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) <= 1e-12
    assert any(key[0] == saved.kernel for key in kernels._WRITING_STEPS) == compiled


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(CASES))
def test_reusing_body_vjp_equals_the_bodys(name, seed):
    """The VJP of the step batched over time, reading the kept products, equals autograd's
    through the body recomputing them: for the step inputs and weights with the consumed
    states held constant (DSF's), and for the consumed states too (adaptive λ's probe)."""
    loop, xs, init, weights = _case(name, seed + 10)
    saved = kernels.register_products(loop)
    n_c = len(init)
    with torch.no_grad():
        outputs = kernels.run_kernel(saved.kernel, False, xs, init, weights)
    states, products = outputs[:n_c], outputs[n_c:]
    previous = [torch.cat([c[None], s[:-1]]) for c, s in zip(init, states)]
    gen = torch.Generator().manual_seed(seed)
    cotangents = tuple(torch.randn(s.shape, dtype=s.dtype, generator=gen) for s in states)
    dims = (0,) * (len(xs) + n_c) + (None,) * len(weights)

    def recomputing(xs, ws, prevs):
        return tuple(torch.func.vmap(loop.body, in_dims=dims)(*xs, *prevs, *ws))

    def reusing(xs, ws, prevs):
        body = torch.func.vmap(saved.body, in_dims=dims + (0,) * len(products))
        return tuple(body(*xs, *prevs, *ws, *products))

    for with_states in (False, True):
        results = []
        for f in (recomputing, reusing):
            if with_states:
                values, vjp = torch.func.vjp(f, tuple(xs), tuple(weights), tuple(previous))
            else:
                values, vjp = torch.func.vjp(lambda a, b, f=f: f(a, b, previous), tuple(xs), tuple(weights))
            results.append((values, vjp(cotangents)))
        (want_values, want), (got_values, got) = results
        assert_close(dict(enumerate(got_values)), dict(enumerate(want_values)), 1e-12)
        flat = [dict(enumerate(g for group in grads for g in group)) for grads in (got, want)]
        assert len(flat[0]) == len(flat[1])
        assert_close(*flat, 1e-12)


def test_reusing_body_reads_the_saved_values():
    """Forward values come from the products passed in, not from recomputation: a body
    given other values returns what follows from those."""
    loop, xs, init, weights = _case("linear-recurrence", 3)
    saved = kernels.register_products(loop)
    other = torch.randn(init[0].shape, dtype=torch.float64)
    (value,) = saved.body(xs[0][0], init[0], *weights, other)
    assert rel_err(value, other + xs[0][0]) <= 1e-15


def test_reused_product_gradients_take_their_inputs_dtypes():
    """A 16-bit product of float32 weights (autocast's): each gradient in its input's
    dtype, equal to autograd's through the product computed in float32."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 3, 4, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(5, 4, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    grad = torch.randn(6, 3, 5, generator=gen).to(torch.bfloat16)
    saved = F.linear(a.float(), weight, bias).to(torch.bfloat16).detach()
    got = torch.autograd.grad(reuse_product(saved, a, weight, bias, True), (a, weight, bias), grad)
    want = torch.autograd.grad(F.linear(a.float(), weight, bias), (a, weight, bias), grad.float())
    for g, w, t in zip(got, want, (a, weight, bias)):
        assert g.dtype == t.dtype and rel_err(g.float(), w.float()) <= 1e-2
