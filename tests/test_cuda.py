"""The CUDA paths: Triton scan kernels, cuDNN forwards, graphed rolled loops, Inductor.

Skipped on machines without a GPU (CI); run on the GPU machine with
``python -m pytest -q tests/test_cuda.py``.  Every check compares with a reference
computed in float64 on the CPU, on random inputs; TF32 is off so float32 is float32.
"""

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import dsf_compile
from dsf_compile import kernels, triton_scan
from dsf_compile.models import HandWrittenGRULM
from dsf_compile.ops import chunked_linear_scan, reverse_linear_scan

from .helpers import assert_close, make_case, rel_err, run_compiled
from .reference import dsf_reference
from .test_ops import literal
from .test_rnn_modules import _lams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def no_tf32_fresh_caches():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.compiler.config.patch(force_disable_caches=True):
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


SHAPES = [(1, 1, 1), (7, 3, 5), (64, 128, 256), (300, 2, 33), (1024, 32, 512), (4096, 8, 512)]


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_scan_matches_the_literal_recurrence(shape, dtype, backwards):
    T, B, S = shape
    g = torch.randn(T, B, S, device="cuda").to(dtype)
    lam = torch.rand(S, device="cuda")
    lam[0], lam[-1] = 0.0, 1.0
    want = literal(g.double().cpu(), lam.double().cpu(), backwards)
    plans = [None, triton_scan.ScanPlan(32, 64, 4, 64), triton_scan.ScanPlan(16, 32, 2, 16)]
    for plan in plans:
        got = triton_scan.launch_linear_scan(g, lam, backwards, plan)
        assert got.dtype == dtype
        assert rel_err(got.double().cpu(), want) <= TOLERANCE[dtype], plan
    got = reverse_linear_scan(g, lam, backwards)  # the triton_op, eagerly
    assert rel_err(got.double().cpu(), want) <= TOLERANCE[dtype]
    if dtype == torch.float32:
        assert rel_err(chunked_linear_scan(g, lam, backwards).double().cpu(), want) <= 1e-5


def test_triton_scan_inside_an_inductor_graph():
    compiled = torch.compile(lambda g, lam: reverse_linear_scan(g * 2, lam) + 1, fullgraph=True)
    for T in (5, 70):
        g = torch.randn(T, 4, 16, device="cuda")
        lam = torch.rand(16, device="cuda")
        want = literal((g * 2).double().cpu(), lam.double().cpu(), True) + 1
        assert rel_err(compiled(g, lam).double().cpu(), want) <= 1e-5


@pytest.mark.parametrize("kind,mode", list(itertools.product(["rnn_tanh", "gru", "lstm"], ["dsf", "ft"])))
def test_recurrent_modules_on_cuda_match_the_reference(kind, mode):
    module, x, h0, loss_fn = make_case(kind, 2, True, True, True, True, torch.float64, seed=31)
    want_outputs, want = dsf_reference(module, x, h0, _lams(module, mode, torch.float64), loss_fn)
    on_cuda = lambda t: None if t is None else (tuple(on_cuda(s) for s in t) if isinstance(t, tuple) else
                                                  t.float().cuda())
    model, outputs, grads = run_compiled(module.float().cuda(), on_cuda(x), on_cuda(h0),
                                         lambda *outs: loss_fn(*(o.double().cpu() for o in outs)), mode,
                                         compiler="inductor")
    for got, ref in zip(outputs, want_outputs):
        assert rel_err(got.double().cpu(), ref) <= 1e-5
    assert_close({k: v.double().cpu() for k, v in grads.items()}, want, 1e-4)
    backward = [g for k, g in model._dsf_backend.graphs if k == "backward"][0].code
    # the scan is the Triton kernels, visible to Inductor, not the opaque op
    assert "triton_kernel_wrapper" in backward and "reverse_linear_scan" not in backward


def test_exact_mode_on_cuda_equals_cudnn_bptt():
    module, x, h0, loss_fn = make_case("gru", 2, False, True, True, True, torch.float32, seed=32)
    module, x, h0 = module.cuda(), x.cuda(), h0.cuda()
    on_cpu = lambda *outs: loss_fn(*(o.cpu() for o in outs))
    _, got_out, got = run_compiled(module, x, h0, on_cpu, "bptt", compiler="inductor")
    eager = copy.deepcopy(module)
    x_leaf, h_leaf = x.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h_n = eager(x_leaf, h_leaf)
    on_cpu(out, h_n).backward()
    want = {n: p.grad for n, p in eager.named_parameters()}
    want.update(x=x_leaf.grad, h0=h_leaf.grad)
    assert rel_err(got_out[0], out.detach()) <= 1e-5
    assert_close(got, want, 1e-4)


def test_hand_written_cells_on_cuda_match_the_cpu_path():
    """Graphed rolled forward (Inductor-compiled step, one CUDA graph per signature,
    shared by both layers) and Triton scan against the CPU path in float64, over two
    different batches (graph replays with new inputs) and a new length."""
    torch.manual_seed(4)
    reference = HandWrittenGRULM(50, 32, 2).double()
    cpu = dsf_compile.apply(copy.deepcopy(reference), "dsf", compiler="aot_eager")
    gpu = dsf_compile.apply(copy.deepcopy(reference).float().cuda(), "dsf")
    kernels._GRAPHS.clear()
    for shape in [(4, 16), (4, 16), (4, 24)]:
        tokens = torch.randint(0, 50, shape)
        for model in (cpu, gpu):
            model.zero_grad()
        want = cpu(tokens)
        want.logsumexp(-1).mean().backward()
        got = gpu(tokens.cuda())
        got.logsumexp(-1).mean().backward()
        assert rel_err(got.double().cpu(), want.detach()) <= 1e-5
        for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
            assert rel_err(p.grad.double().cpu(), q.grad) <= 1e-4, name
    assert len(kernels._GRAPHS) == 2  # one per shape, shared by the two layers


def test_language_model_step_on_cuda_runs_in_every_mode():
    from dsf_compile.models import TransformerLikeRNN

    for mode in ("bptt", "ft", "dsf"):
        torch.manual_seed(0)
        model = dsf_compile.apply(TransformerLikeRNN(100, 64, 2).cuda(), mode)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        tokens = torch.randint(0, 100, (8, 33), device="cuda")
        losses = []
        for _ in range(20):
            loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], (mode, losses)


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (300, 2, 33), (1024, 32, 512)])
def test_triton_scan_with_a_decay_per_step_matches_the_loop(shape, dtype, backwards):
    """Highway-BP's scan: the triton op, eagerly and inside an Inductor graph."""
    g = torch.randn(shape, device="cuda").to(dtype)
    decay = torch.rand(shape, device="cuda")
    want = torch.ops.dsf.reverse_linear_scan(g.double().cpu(), decay.double().cpu(), backwards)
    assert rel_err(reverse_linear_scan(g, decay, backwards).double().cpu(), want) <= TOLERANCE[dtype]
    compiled = torch.compile(lambda g, d: reverse_linear_scan(g * 2, d, backwards) + 1, fullgraph=True)
    assert rel_err(compiled(g, decay).double().cpu(), 2 * want + 1) <= TOLERANCE[dtype]


@pytest.mark.parametrize("kind,options", [("gru", {"mode": "highway", "iterations": 2}),
                                          ("lstm", {"mode": "highway", "iterations": 0})])
def test_highway_and_adaptive_on_cuda_match_the_cpu_path(kind, options):
    module, x, h0, loss_fn = make_case(kind, 2, True, False, True, True, torch.float64, seed=4)
    _, want_out, want = run_compiled(module, x, h0, loss_fn, compiler="aot_eager", **options)
    to = lambda t: None if t is None else tuple(s.cuda() for s in t) if isinstance(t, tuple) else t.cuda()
    cuda_loss = lambda *outs: loss_fn(*(o.cpu() for o in outs))
    _, got_out, got = run_compiled(module.cuda(), to(x), to(h0), cuda_loss, compiler="inductor", **options)
    for a, b in zip(got_out, want_out):
        assert rel_err(a.cpu(), b) <= 1e-10
    assert_close({k: v.cpu() for k, v in got.items()}, want, 1e-8)


def test_adaptive_lam_on_cuda_is_exact_for_a_diagonal_linear_rnn():
    from .test_gradient_modes import DiagonalLinearRNN

    torch.manual_seed(0)
    model = DiagonalLinearRNN(torch.rand(16)).cuda()
    x, w_out = torch.randn(40, 8, 3, device="cuda"), torch.randn(40, 8, 16, device="cuda")
    compiled = dsf_compile.apply(copy.deepcopy(model), "dsf", "adaptive")
    (compiled(x) * w_out).sum().backward()
    (model(x) * w_out).sum().backward()
    for p, q in zip(compiled.parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5
