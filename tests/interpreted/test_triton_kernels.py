"""The Triton scan kernels, run on CPU tensors by Triton's interpreter.

Collected only with ``TRITON_INTERPRET=1`` (``tests/test_triton_scan.py`` runs this file
in a subprocess that sets it): the variable must be set before Triton is imported.
"""

import itertools

import pytest
import torch

from dsf_compile.ops import looped_linear_scan
from dsf_compile.triton_scan import ScanPlan, launch_linear_scan, launch_varying_scan, linear_recurrence, plan_scan

from ..helpers import assert_close, make_case, rel_err, run_compiled
from ..reference import dsf_reference
from ..test_ops import literal
from ..test_rnn_modules import _lams

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}
# tile shapes and segment lengths that make every path run: one or several tiles per
# segment, one or several segments, partial last tiles, column blocks wider than C
PLANS = [None, ScanPlan(4, 8, 4, 4), ScanPlan(4, 2, 4, 8), ScanPlan(8, 4, 4, 16), ScanPlan(2, 16, 4, 64)]


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("seed", range(3))
def test_kernels_match_the_literal_recurrence(seed, dtype, backwards):
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 40, (1,), generator=gen))
    B = int(torch.randint(1, 4, (1,), generator=gen))
    S = int(torch.randint(1, 7, (1,), generator=gen))
    g = torch.randn(T, B, S, dtype=torch.float64, generator=gen).to(dtype)
    lam = torch.rand(S, dtype=torch.float64, generator=gen)
    lam[0] = 0.0
    lam[-1] = 1.0
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    want = literal(g.double(), lam.to(accumulator).double(), backwards)
    for plan in PLANS:
        got = launch_linear_scan(g, lam.to(accumulator), backwards, plan)
        assert got.dtype == dtype and got.shape == g.shape
        assert rel_err(got.double(), want) <= TOLERANCE[dtype], f"plan {plan}, T={T} B={B} S={S}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (31, 2, 5), (70, 3, 40)])
def test_time_varying_recurrence_matches_the_loop(shape, dtype):
    """An LSTM's cell states from its gates: c_t = f_t ⊙ c_{t-1} + w_t from c_0."""
    gen = torch.Generator().manual_seed(sum(shape))
    forget = torch.rand(shape, generator=gen, dtype=torch.float64)
    write = torch.randn(shape, generator=gen, dtype=torch.float64)
    init = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    want, c = [], init
    for t in range(shape[0]):
        c = forget[t] * c + write[t]
        want.append(c)
    got = linear_recurrence(forget.to(dtype), write.to(dtype), init.to(dtype))
    assert got.dtype == dtype and rel_err(got.double(), torch.stack(want)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 2, 5), (70, 3, 40)])
def test_scan_with_a_decay_per_step_matches_the_loop(shape, dtype, backwards):
    """Highway-BP's scan: δ_t = g_t + a_t ⊙ δ_{t±1}, against the loop of the CPU op."""
    gen = torch.Generator().manual_seed(sum(shape) + backwards)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    decay = torch.rand(shape, generator=gen, dtype=torch.float64).to(accumulator)
    want = looped_linear_scan(g.double(), decay.double(), backwards)
    got = launch_varying_scan(g, decay, backwards)
    assert got.dtype == dtype and got.shape == g.shape
    assert rel_err(got.double(), want) <= TOLERANCE[dtype]


def test_default_plan_splits_time_only_when_columns_are_few():
    cpu = torch.device("cpu")
    assert plan_scan(256, 128 * 512, cpu).segment >= 256
    few = plan_scan(4096, 1, cpu)
    assert few.segment % few.block_t == 0 and few.segment >= few.block_t
    assert all(plan_scan(T, 1, cpu).segment % 32 == 0 for T in (1, 31, 33, 1000))


@pytest.fixture
def triton_kernels_on_cpu():
    """Route the opaque scan op's CPU kernel through the Triton kernels for one test."""
    library = torch.library.Library("dsf", "IMPL")
    library.impl("reverse_linear_scan", lambda g, lam, backwards: launch_linear_scan(g, lam, backwards), "CPU")
    yield
    library._destroy()


@pytest.mark.parametrize("kind,mode", list(itertools.product(["gru", "lstm"], ["dsf", "ft"])))
def test_dsf_gradients_through_the_kernels_match_the_reference(triton_kernels_on_cpu, kind, mode):
    module, x, h0, loss_fn = make_case(kind, 2, True, False, True, True, dtype=torch.float64, seed=5)
    _, _, grads = run_compiled(module, x, h0, loss_fn, mode)
    _, want = dsf_reference(module, x, h0, _lams(module, mode, torch.float64), loss_fn)
    assert_close(grads, want, 1e-9)
