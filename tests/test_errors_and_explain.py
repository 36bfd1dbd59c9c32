"""Bad input gets a clear error or warning; explain() reports what was found."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import dsf_compile

from .helpers import GRUCellLoop, assert_close, assert_trains_exactly, rel_err, run_compiled, run_eager


class TwoLayerLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.encoder = nn.GRU(4, 6, 2, bidirectional=True)
        self.decoder = nn.LSTM(12, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, tokens):
        y, _ = self.encoder(self.embed(tokens))
        z, (h, c) = self.decoder(y)
        return self.head(z)


def test_model_without_recurrence_warns_and_stays_exact():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    ref = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    ref.load_state_dict(mlp.state_dict())
    dsf_compile.apply(mlp, compiler="aot_eager")
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no recurrent loop"):
        mlp(x).sum().backward()
    ref(x).sum().backward()
    assert torch.allclose(mlp[0].weight.grad, ref[0].weight.grad)


def test_strict_model_without_recurrence_raises():
    mlp = dsf_compile.apply(nn.Linear(3, 4), strict=True, compiler="aot_eager")
    with pytest.raises(dsf_compile.UnsupportedLoopError, match="no recurrent loop.*would train with ordinary exact"):
        mlp(torch.randn(2, 3))


def test_lstm_with_projection_is_left_exact_and_reported():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    loss_fn = lambda out, h, c: out.sum() + c.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, outputs, grads = run_compiled(lstm, x, None, loss_fn, "dsf")
    want_outputs, want = run_eager(lstm, x, None, loss_fn)
    assert_close(grads, want, 1e-9)
    report = dsf_compile.report(model)
    assert report.loops == []
    assert len(report.left_exact) == 1 and "proj_size" in report.left_exact[0].reason
    assert "proj_size" in str(report)


def test_lstm_with_projection_strict_raises():
    lstm = dsf_compile.apply(nn.LSTM(3, 5, proj_size=2), strict=True, compiler="aot_eager")
    with pytest.raises(dsf_compile.UnsupportedLoopError, match="proj_size.*would train with exact gradients"):
        lstm(torch.randn(4, 2, 3))


def test_feedback_of_wrong_size_names_the_loop():
    model = dsf_compile.apply(nn.GRU(3, 5), feedback=torch.full((4,), 0.5), compiler="aot_eager")
    with pytest.raises(dsf_compile.FeedbackError, match=r"nn\.GRU.*layer 0.*expected \(5,\)"):
        model(torch.randn(4, 2, 3))


def test_feedback_tensor_applies_to_loops_of_its_size_only():
    model = dsf_compile.apply(TwoLayerLM(), feedback=torch.full((6,), 0.5), compiler="aot_eager")
    with pytest.raises(dsf_compile.FeedbackError, match=r"nn\.LSTM 'decoder'.*expected \(8,\)"):
        model(torch.randint(0, 11, (5, 2)))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), torch.tensor([0.2, 1.2])])
def test_feedback_outside_unit_interval_is_rejected_early(bad):
    with pytest.raises(dsf_compile.FeedbackError, match=r"\[0, 1\]"):
        dsf_compile.apply(nn.GRU(3, 2), feedback=bad)


def test_callable_feedback_outside_unit_interval_is_rejected_at_compile():
    model = dsf_compile.apply(nn.GRU(3, 2), feedback=lambda loop: torch.full((loop.state_size,), 2.0),
                              compiler="aot_eager")
    with pytest.raises(dsf_compile.FeedbackError, match=r"layer 0.*\[0, 1\]"):
        model(torch.randn(3, 1, 3))


def _raises(loop):
    raise KeyError(loop.state_size)


@pytest.mark.parametrize("feedback,match", [
    (_raises, "the feedback callable raised for loop nn.GRU .* layer 0 .*: KeyError: 2"),
    (lambda loop: None, "the feedback callable returned NoneType for loop .*expected a float or 2 values"),
])
def test_a_failing_feedback_callable_is_named_not_reported_as_a_compiler_crash(feedback, match):
    model = dsf_compile.apply(nn.GRU(3, 2), feedback=feedback, compiler="aot_eager")
    with pytest.raises(dsf_compile.FeedbackError, match=match) as caught:
        model(torch.randn(3, 1, 3))
    if feedback is _raises:
        assert isinstance(caught.value.__cause__, KeyError)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "tbpt"}, "mode='tbpt': expected one of 'dsf'"),
    ({"feedback": "ones"}, "feedback='ones'"),
    ({"feedback": torch.zeros(2, 2)}, "1-D"),
    ({"compiler": "tvm"}, "compiler='tvm'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dsf_compile.apply(nn.GRU(3, 2), **kwargs)


def test_explain_lists_every_loop():
    model = TwoLayerLM()
    report = dsf_compile.explain(model, torch.randint(0, 11, (7, 3)))
    assert len(report.loops) == 5
    encoder = [r for r in report.loops if "'encoder'" in r.name]
    decoder = [r for r in report.loops if "'decoder'" in r.name]
    assert [r.direction for r in encoder] == ["forward", "reverse", "forward", "reverse"]
    assert all(r.length == "7" and r.batch == "3" and r.state_size == 6 for r in encoder)
    assert decoder[0].state_size == 8 and decoder[0].carries == "h[4], c[4]"
    assert decoder[0].feedback == "linspace(0, 1, 8)"
    assert all(r.source.endswith("test_errors_and_explain.py:" + r.source.rsplit(":", 1)[1]) for r in report.loops)
    assert report.left_exact == []
    text = str(report)
    assert "5 recurrent loop(s)" in text and "decoder" in text
    # explain does not change or compile the model
    assert "forward" not in vars(model)


def test_uniform_feedback_is_seeded_and_differs_per_loop():
    model = TwoLayerLM()
    x = torch.randint(0, 11, (4, 2))
    a = dsf_compile.explain(model, x, feedback="uniform", seed=1)
    b = dsf_compile.explain(model, x, feedback="uniform", seed=1)
    c = dsf_compile.explain(model, x, feedback="uniform", seed=2)
    summaries = [r.feedback for r in a.loops]
    assert summaries == [r.feedback for r in b.loops]
    assert summaries != [r.feedback for r in c.loops]
    assert len(set(summaries)) == len(summaries)


class PackedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4)

    def forward(self, x, lengths):
        _, h = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths))
        return h


def test_packed_sequence_is_listed_by_explain_and_trained_with_the_rule():
    """Dynamo cannot trace the packing; the applied model's GRU takes the packed call
    itself (tests/test_packed.py checks its gradients) and explain() lists it too."""
    torch.manual_seed(0)
    x, lengths = torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([5, 3])
    report = dsf_compile.explain(PackedGRU().double(), x, lengths)
    (loop,) = report.loops
    assert loop.name == "nn.GRU 'rnn' (packed sequence) layer 0" and loop.length == "5"
    assert any("pack_padded_sequence" in reason for reason in report.graph_breaks)
    model, ref = PackedGRU().double(), PackedGRU().double()
    ref.load_state_dict(model.state_dict())
    dsf_compile.apply(model, compiler="aot_eager")
    model(x, lengths).sum().backward()
    ref(x, lengths).sum().backward()
    assert [loop.name for loop in dsf_compile.report(model).loops] == [loop.name]
    assert not torch.allclose(model.rnn.weight_hh_l0.grad, ref.rnn.weight_hh_l0.grad)  # DSF's, not BPTT's
    projected = nn.LSTM(3, 4, proj_size=2).double()
    (item,) = dsf_compile.explain(_Packing(projected), x, lengths).left_exact
    assert item.reason == "packed sequence: LSTM with proj_size is not supported"


class _Packing(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        return self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths))[1][0]


def test_left_exact_multi_layer_op_warns_that_torch_drops_its_dropout():
    lstm = nn.LSTM(3, 5, 2, proj_size=2, dropout=0.3)
    report = dsf_compile.explain(lstm.train(), torch.randn(4, 2, 3))
    (item,) = report.left_exact
    assert "proj_size" in item.reason and "drops its inter-layer dropout" in item.reason


def test_a_copy_of_an_applied_model_trains_its_own_parameters():
    import copy

    model = dsf_compile.apply(nn.GRU(3, 4), compiler="aot_eager")
    x = torch.randn(5, 2, 3)
    model(x)[0].sum().backward()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.weight_hh_l0.mul_(2)
    twin.zero_grad()
    model.zero_grad()
    twin(x)[0].sum().backward()
    assert twin.weight_hh_l0.grad is not None and model.weight_hh_l0.grad is None
    assert not torch.allclose(twin(x)[0], model(x)[0])


def test_apply_after_a_plain_compile_of_the_same_class_still_rewrites():
    """Plain torch.compile marks RNNLanguageModel.forward as a frame to skip (nn.GRU breaks
    the graph inside its loop over layers); apply must not silently inherit that."""
    from dsf_compile.models import RNNLanguageModel

    tokens = torch.randint(0, 20, (2, 6))
    torch.compile(RNNLanguageModel(20, 4, 2))(tokens)
    model = dsf_compile.apply(RNNLanguageModel(20, 4, 2), compiler="aot_eager")
    model(tokens).sum().backward()
    assert len(dsf_compile.report(model).loops) == 2


class _Tagger(nn.Module):
    """An LSTM tagger trained through its loss method, which calls the LSTM directly (the
    shape of a BiLSTM-CRF's ``neg_log_likelihood``); ``forward`` predicts."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 5)

    def scores(self, x):
        return self.head(self.lstm(x)[0])

    def forward(self, x):
        return self.scores(x).argmax(-1)

    def neg_log_likelihood(self, x, tags):
        return nn.functional.cross_entropy(self.head(self.lstm(x)[0]).flatten(0, 1), tags.flatten())


def test_a_recurrent_module_trained_outside_the_compiled_methods_is_reported_and_methods_fix_it():
    torch.manual_seed(10)
    reference = _Tagger().double()
    x, tags = torch.randn(2, 6, 3, dtype=torch.float64), torch.randint(0, 5, (2, 6))
    model = dsf_compile.apply(copy.deepcopy(reference), "dsf", compiler="aot_eager")
    with torch.no_grad():
        model(x)  # inference through forward: rewritten, nothing to say
    assert len(dsf_compile.report(model).loops) == 1 and dsf_compile.report(model).eager_calls == []
    with pytest.warns(UserWarning, match="'lstm' \\(LSTM\\) ran outside the compiled method\\(s\\) forward, called "
                                         "from 'neg_log_likelihood': it trains with exact gradients"):
        model.neg_log_likelihood(x, tags).backward()
    assert "neg_log_likelihood" in dsf_compile.report(model).eager_calls[0]

    fixed = dsf_compile.apply(copy.deepcopy(reference), "dsf", compiler="aot_eager",
                              methods=("forward", "neg_log_likelihood"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed.neg_log_likelihood(x, tags).backward()
    assert dsf_compile.report(fixed).eager_calls == [] and len(dsf_compile.report(fixed).loops) == 1
    # the same DSF gradients as a model that trains the same loss through its forward
    through_forward = dsf_compile.apply(copy.deepcopy(reference), "dsf", compiler="aot_eager", methods=("scores",))
    nn.functional.cross_entropy(through_forward.scores(x).flatten(0, 1), tags.flatten()).backward()
    exact = copy.deepcopy(reference)
    exact.neg_log_likelihood(x, tags).backward()
    for (name, p), q in zip(fixed.named_parameters(), through_forward.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12, name
    assert rel_err(fixed.lstm.weight_hh_l0.grad, exact.lstm.weight_hh_l0.grad) > 1e-3  # DSF, not BPTT


class _DisabledEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.rnn = nn.GRU(4, 5)
        self.head = nn.Linear(5, 7)

    @torch.compiler.disable
    def encode(self, x):
        return self.rnn(x)[0]

    def forward(self, tokens):
        return self.head(self.encode(self.embedding(tokens)))


def test_a_recurrent_module_left_out_of_the_graph_by_a_break_is_reported():
    """A recurrent module called from code Dynamo will not trace runs eagerly inside the
    compiled forward: exact gradients, and the report says which module and why."""
    torch.manual_seed(0)
    model = _DisabledEncoder().double()
    tokens = torch.randint(0, 7, (6, 3))
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    with pytest.warns(UserWarning, match="'rnn' \\(GRU\\) ran eagerly inside the compiled method"):
        compiled(tokens).sum().backward()
    model(tokens).sum().backward()
    for p, q in zip(compiled.parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12
    report = dsf_compile.report(compiled)
    assert not report.loops and report.graph_breaks
    assert len(report.eager_calls) == 1 and "apply dsf_compile to 'rnn' itself" in report.eager_calls[0]


class _EncoderThenStoppingLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.GRU(4, 5)
        self.cell = nn.GRUCell(5, 5)

    def forward(self, x, threshold):
        out, h = self.encoder(x)
        h = h[0]
        for t in range(x.shape[0]):
            h = self.cell(out[t], h)
            if h.sum() > threshold:  # a data-dependent break: Dynamo breaks the graph here
                break
        return h


def test_a_loop_with_a_data_dependent_break_is_reported_as_a_graph_break():
    """The encoder is rewritten; the stopping loop runs step by step in graph pieces, so
    its cell trains exactly, and the report says why instead of staying silent."""
    torch.manual_seed(0)
    model = _EncoderThenStoppingLoop().double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    out = compiled(x, 100.0)
    assert rel_err(out.detach(), model(x, 100.0).detach()) <= 1e-12
    report = dsf_compile.report(compiled)
    assert [loop.rewrite for loop in report.loops] == ["dsf"]
    assert any("data-dependent" in reason.lower() for reason in report.graph_breaks), report


def test_apply_names_what_it_takes():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        dsf_compile.apply(lambda x: x)
    with pytest.raises(ValueError, match="has no method 'train_step'"):
        dsf_compile.apply(_Tagger(), methods=("forward", "train_step"))


class _Decoder(nn.Module):
    """A seq2seq decoder that calls nn.GRU on a length-1 input at each step, its state
    kept as nn.GRU returns it (1, B, H) or as (B, H)."""

    def __init__(self, squeezed):
        super().__init__()
        self.squeezed = squeezed
        self.embedding, self.gru, self.out = nn.Embedding(10, 4), nn.GRU(4, 5), nn.Linear(5, 10)

    def forward(self, targets, h):
        logits = []
        for t in range(targets.shape[0]):
            o, h = self.gru(self.embedding(targets[t])[None], h[None] if self.squeezed else h)
            h = h[0] if self.squeezed else h
            logits.append(self.out(o[0]))
        return torch.stack(logits)


@pytest.mark.parametrize("squeezed", [False, True])
@pytest.mark.parametrize("mode", ["dsf", "ft"])
def test_one_step_recurrent_calls_in_a_decoder_loop_stay_exact_with_one_story(mode, squeezed):
    """Rewriting each length-1 call alone gave a hybrid gradient (λ in place of the outer
    loop's Jacobian) while the loop was reported exact: both stay exact, and explain and
    report say the same."""
    torch.manual_seed(11)
    model = _Decoder(squeezed).double()
    targets, h0 = torch.randint(0, 10, (5, 2)), torch.randn(1, 2, 5, dtype=torch.float64)
    h0 = h0[0] if squeezed else h0
    explained = dsf_compile.explain(model, targets, h0, mode=mode)
    report = assert_trains_exactly(model, mode, targets, h0)
    assert explained.loops == report.loops == []
    assert [e.reason for e in explained.left_exact] == [e.reason for e in report.left_exact]
    assert any("single step (T=1)" in e.reason for e in report.left_exact)
    (outer,) = [e for e in report.left_exact if e.what.startswith("loop over")]
    if not squeezed:  # (squeezed, the last step's dead ``h[0]`` already tells it apart)
        assert "the step calls a recurrent module (gru)" in outer.reason


class _Checkpointed(nn.Module):
    """An nn.GRU and a loop over a GRUCell, each under activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.gru, self.loop = nn.GRU(3, 4), GRUCellLoop(3, 4)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda x: self.gru(x)[0], x, use_reentrant=False) + checkpoint(self.loop, x,
                                                                                          use_reentrant=False)


def test_loops_under_activation_checkpointing_are_exact_and_reported():
    torch.manual_seed(13)
    model = _Checkpointed().double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    left = assert_trains_exactly(model, "dsf", x).left_exact
    assert sorted(e.what.split(" ")[0] for e in left) == ["Python", "nn.GRU"]
    assert all("torch.utils.checkpoint" in e.reason for e in left)
    with pytest.raises(dsf_compile.UnsupportedLoopError, match="checkpoint"):
        dsf_compile.apply(copy.deepcopy(model), "dsf", compiler="aot_eager", strict=True)(x)


def test_reports_speak_of_the_users_names_lines_and_call():
    """Carries by the names the user's code gives them, sources at the user's lines, a bare
    module's loops at the line that called it, warnings pointing at that line."""
    from .helpers import GRUCellLoop

    model, x = GRUCellLoop(), torch.randn(5, 2, 3)
    (loop,) = dsf_compile.explain(model, x).loops
    assert loop.carries == "h[4]" and loop.source.endswith(f"helpers.py:{_line(GRUCellLoop.forward, 'self.cell(')}")
    gru = dsf_compile.apply(nn.GRU(3, 4), compiler="aot_eager")
    gru(x)  # a bare nn.GRU: no frame of the user's code in its graph
    call = _line(test_reports_speak_of_the_users_names_lines_and_call, "gru(x)  # a bare")
    assert dsf_compile.report(gru).loops[0].source.endswith(f"test_errors_and_explain.py:{call}")
    mlp = dsf_compile.apply(nn.Linear(3, 4), compiler="aot_eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlp(torch.randn(2, 3))
    assert not [w for w in caught if "dsf_compile" in str(w.message)]  # a call that trains nothing: no verdict yet
    with pytest.warns(UserWarning, match="found no recurrent loop") as warned:
        mlp(torch.randn(2, 3))  # warned here
    assert warned[0].filename == __file__
    assert warned[0].lineno == _line(test_reports_speak_of_the_users_names_lines_and_call, "# warned here")


def _line(function, text: str) -> int:
    import inspect

    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_a_report_before_the_first_call_says_so_and_applying_twice_is_refused():
    model = dsf_compile.apply(nn.GRU(3, 4), compiler="aot_eager")
    assert str(dsf_compile.report(model)).startswith("not traced yet")
    with pytest.raises(ValueError, match="already applied"):
        dsf_compile.apply(model, "ft")
    model(torch.randn(5, 2, 3))
    assert str(dsf_compile.report(model)).startswith("1 recurrent loop(s)")
