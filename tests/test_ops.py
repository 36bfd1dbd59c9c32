"""The custom ops on their own."""

import pytest
import torch

from dsf_compile.ops import chunked_linear_scan, reverse_linear_scan


def literal(g, lam, backwards):
    out = torch.empty_like(g)
    order = range(g.shape[0] - 1, -1, -1) if backwards else range(g.shape[0])
    acc = torch.zeros_like(g[0])
    for t in order:
        acc = g[t] + lam * acc
        out[t] = acc
    return out


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_scan_forms_match_the_literal_recurrence(seed, backwards):
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 70, (1,), generator=gen))
    shape = [int(s) for s in torch.randint(1, 5, (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen)]
    S = int(torch.randint(1, 9, (1,), generator=gen))
    g = torch.randn(T, *shape, S, dtype=torch.float64, generator=gen)
    lam = torch.rand(S, dtype=torch.float64, generator=gen)
    lam[0] = 0.0
    want = literal(g, lam, backwards)
    assert torch.allclose(reverse_linear_scan(g, lam, backwards), want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked_linear_scan(g, lam, backwards), want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(chunked_linear_scan(g, lam, backwards, chunk=5), want, rtol=1e-10, atol=1e-12)


def test_scan_op_passes_opcheck():
    g = torch.randn(7, 3, 4)
    torch.library.opcheck(torch.ops.dsf.reverse_linear_scan.default, (g, torch.rand(4), True))


@pytest.mark.parametrize("backwards", [True, False])
def test_16_bit_gradients_accumulate_in_float32(backwards):
    """Over many steps with decays near 1, a bf16 accumulator drifts by far more than the
    rounding of the result: the scan keeps its running δ in float32."""
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(400, 2, 8, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    lam = torch.full((8,), 0.999, dtype=torch.float64)
    want = literal(g.double(), lam, backwards)
    for scan in (reverse_linear_scan, chunked_linear_scan):
        got = scan(g, lam.float(), backwards)
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).norm() / want.norm()).item() < 4e-3
