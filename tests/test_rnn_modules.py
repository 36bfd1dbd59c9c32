"""apply() on nn.RNN / nn.GRU / nn.LSTM against the literal reference (DESIGN.md §1)."""

import contextlib
import itertools
import zlib

import pytest
import torch

import dsf_compile

from .helpers import assert_close, make_case, rel_err, run_compiled, run_eager
from .reference import dsf_reference

KINDS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
# (layers, bidirectional, batch_first, bias, with_h0): every value of every option,
# each pair of options together at least once.
CONFIGS = [
    (1, False, False, True, False),
    (2, True, True, True, True),
    (3, False, True, False, True),
    (2, True, False, False, False),
    (1, True, True, True, False),
    (2, False, False, True, True),
]


def _lams(module, mode, dtype):
    D = 2 if module.bidirectional else 1
    size = module.hidden_size * (2 if isinstance(module, torch.nn.LSTM) else 1)
    lam = torch.linspace(0, 1, size, dtype=dtype) if mode == "dsf" else torch.zeros(size, dtype=dtype)
    return [lam] * (module.num_layers * D)


@pytest.mark.parametrize("mode", ["dsf", "ft"])
@pytest.mark.parametrize("kind,config", list(itertools.product(KINDS, CONFIGS)))
def test_matches_literal_reference_float64(kind, config, mode):
    seed = zlib.crc32(repr((kind, config, mode)).encode()) % 10_000
    module, x, h0, loss_fn = make_case(kind, *config, dtype=torch.float64, seed=seed)
    single_step = x.shape[1 if module.batch_first else 0] == 1
    with pytest.warns(UserWarning, match="single step") if single_step else contextlib.nullcontext():
        model, outputs, grads = run_compiled(module, x, h0, loss_fn, mode)
    loops = 0 if single_step else module.num_layers * (1 + module.bidirectional)
    assert len(dsf_compile.report(model).loops) == loops
    want_outputs, want = dsf_reference(module, x, h0, _lams(module, mode, torch.float64), loss_fn)
    for got, ref in zip(outputs, want_outputs):
        assert rel_err(got, ref) <= 1e-12
    if h0 is None:
        want.pop("h0"), want.pop("c0", None)
    assert_close(grads, want, 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_literal_reference_float32(kind):
    module, x, h0, loss_fn = make_case(kind, 2, True, False, True, True, dtype=torch.float32, seed=7)
    _, outputs, grads = run_compiled(module, x, h0, loss_fn, "dsf")
    want_outputs, want = dsf_reference(module, x, h0, _lams(module, "dsf", torch.float32), loss_fn)
    for got, ref in zip(outputs, want_outputs):
        assert rel_err(got, ref) <= 1e-5
    assert_close(grads, want, 1e-4)


@pytest.mark.parametrize("kind,config", [(k, c) for k in KINDS for c in CONFIGS[:3]])
def test_bptt_mode_is_exact(kind, config):
    module, x, h0, loss_fn = make_case(kind, *config, dtype=torch.float64, seed=11)
    _, outputs, grads = run_compiled(module, x, h0, loss_fn, "bptt")
    want_outputs, want = run_eager(module, x, h0, loss_fn)
    for got, ref in zip(outputs, want_outputs):
        assert rel_err(got, ref) <= 1e-12
    assert_close(grads, want, 1e-9)
