"""A corpus of RNN programs of the kinds users bring, written in this project's words after
patterns common in public tutorials and example repositories (a word-level LM with tied
weights and a hidden state carried across batches, a character-level classifier with a
hand-written cell, a seq2seq GRU with and without attention, an LSTM tagger, a BiLSTM-CRF
trained through its loss method, two stacked LSTMCells on a time series).

Each is trained for a step eagerly and through ``apply``, and checked against the
invariant users rely on: the forward equals eager's; the gradients are the mode's (exact
BPTT: eager autograd; DSF at a constant λ: the straight-through reference of
``tests/reference.py``, or the literal δ recursion where one loop has several cells);
``report()`` lists exactly the loops that were rewritten.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsf_compile
from tests.helpers import rel_err
from tests.reference import dsf_reference_loop, feedback_cell, feedback_rnn, feedback_step

LAM = 0.6
MODES = ["bptt", "dsf"]


def _train(model: nn.Module, run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and parameter gradients (in parameter order) of ``run(model)``, which runs
    a training step and calls ``backward`` itself."""
    torch.manual_seed(1)  # the same dropout masks in every run
    outputs = [o.detach() for o in run(model)]
    return outputs, [p.grad for p in model.parameters()]


def _check(model: nn.Module, run, mode: str, patch_reference, loops: int, methods=("forward",)) -> None:
    """``apply(mode)`` on a copy of ``model``: forward equal to eager, gradients equal to
    eager's (bptt) or to ``patch_reference``'s model (DSF at λ = LAM), ``loops`` loops
    rewritten and none left exact."""
    want_out, eager_grads = _train(copy.deepcopy(model), run)
    options = dict(feedback=LAM) if mode == "dsf" else {}
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager", methods=methods, **options)
    got_out, got = _train(compiled, run)
    for g, w in zip(got_out, want_out):
        assert rel_err(g, w) <= 1e-12
    want = eager_grads
    if mode == "dsf":
        reference = patch_reference(copy.deepcopy(model))
        ref_out, want = _train(reference, run)
        for r, w in zip(ref_out, want_out):  # the reference's forward is eager's too
            assert rel_err(r, w) <= 1e-12
        # DSF is not BPTT here: the comparison can tell them apart
        assert max(rel_err(a, b) for a, b in zip(want, eager_grads) if b.norm() > 0) > 1e-3
    for (name, _), g, w in zip(compiled.named_parameters(), got, want):
        assert g is not None, f"{name}: no gradient"
        assert rel_err(g, w) <= 1e-9, f"{name}: relative error {rel_err(g, w):.3g}"
    report = dsf_compile.report(compiled)
    assert len(report.loops) == loops, report
    assert not report.left_exact and not report.graph_breaks and not report.eager_calls, report
    assert not any("compiled_model" in loop.name for loop in report.loops), report  # the user's module paths
    assert all(loop.rewrite.startswith(mode) or (mode == "bptt" and "exact" in loop.rewrite)
               for loop in report.loops), report


# --- a word-level language model: tied weights, dropout, hidden carried and detached ---


class WordLM(nn.Module):
    def __init__(self, kind: str, vocab: int = 13, size: int = 6, layers: int = 2, dropout: float = 0.3):
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = getattr(nn, kind)(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.encoder.weight  # tied input and output embeddings

    def forward(self, tokens, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        logits = self.decoder(self.drop(output))
        return F.log_softmax(logits.view(-1, logits.shape[-1]), -1), hidden

    def init_hidden(self, batch: int):
        zeros = self.encoder.weight.new_zeros(self.rnn.num_layers, batch, self.rnn.hidden_size)
        return (zeros, zeros.clone()) if self.kind == "LSTM" else zeros


def _detached(hidden):
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("mode", MODES)
def test_word_language_model_with_tied_weights_and_carried_hidden_state(kind, mode):
    torch.manual_seed(0)
    model = WordLM(kind).double()
    stream = torch.randint(0, 13, (2 * 5 + 1, 3))

    def run(m):
        hidden, outputs = m.init_hidden(3), []
        for start in (0, 5):  # two consecutive batches of the stream, the state carried over
            hidden = _detached(hidden)
            log_probs, hidden = m(stream[start : start + 5], hidden)
            F.nll_loss(log_probs, stream[start + 1 : start + 6].reshape(-1)).backward()
            outputs.append(log_probs)
        return outputs

    def reference(m):
        feedback_rnn(m.rnn, LAM)
        return m

    _check(model, run, mode, reference, loops=2)


# --- a character-level classifier: a hand-written cell, the loop in the training code ---


class CharRNN(nn.Module):
    """One step: the letter and the hidden state in, class scores and the next state out."""

    def __init__(self, letters: int = 5, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.i2h = nn.Linear(letters + hidden, hidden)
        self.i2o = nn.Linear(letters + hidden, classes)
        self.hidden_size = hidden

    def forward(self, letter, hidden):
        both = torch.cat([letter, hidden], 1)
        return F.log_softmax(self.i2o(both), 1), torch.tanh(self.i2h(both))


class CharClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = CharRNN()

    def classify(self, line):
        hidden = line.new_zeros(line.shape[1], self.rnn.hidden_size)
        for t in range(line.shape[0]):
            output, hidden = self.rnn(line[t], hidden)
        return output


def _lines():
    letters = torch.randint(0, 5, (6, 2))
    return F.one_hot(letters, 5).double(), torch.tensor([0, 2])


def test_char_classifier_stepped_from_the_training_code_is_exact_and_said_so():
    """Each call of the model is one step: there is no loop for apply to see.  It trains
    exactly, and the user is told so."""
    torch.manual_seed(0)
    rnn = CharRNN().double()
    line, category = _lines()

    def run(m):
        hidden = line.new_zeros(2, 4)
        for t in range(line.shape[0]):
            output, hidden = m(line[t], hidden)
        F.nll_loss(output, category).backward()
        return [output]

    want_out, want = _train(copy.deepcopy(rnn), run)
    compiled = dsf_compile.apply(copy.deepcopy(rnn), compiler="aot_eager")
    with pytest.warns(UserWarning, match="no recurrent loop"):
        got_out, got = _train(compiled, run)
    assert rel_err(got_out[0], want_out[0]) <= 1e-12
    assert all(rel_err(g, w) <= 1e-12 for g, w in zip(got, want))
    assert not dsf_compile.report(compiled).loops


@pytest.mark.parametrize("mode", MODES)
def test_char_classifier_with_its_loop_in_a_method(mode):
    torch.manual_seed(0)
    model = CharClassifier().double()
    line, category = _lines()

    def run(m):
        output = m.classify(line)
        F.nll_loss(output, category).backward()
        return [output]

    def reference(m):
        feedback_cell(m.rnn, LAM, state_at=1)
        return m

    _check(model, run, mode, reference, loops=1, methods=("classify",))


# --- seq2seq: a GRU encoder, a GRUCell decoder with teacher forcing, with and without attention ---


class Seq2Seq(nn.Module):
    def __init__(self, attention: bool, vocab: int = 9, size: int = 5):
        super().__init__()
        self.attention = attention
        self.source_embedding = nn.Embedding(vocab, size)
        self.encoder = nn.GRU(size, size, batch_first=True)
        self.target_embedding = nn.Embedding(vocab, size)
        self.decoder = nn.GRUCell(size, size)
        self.out = nn.Linear(2 * size if attention else size, vocab)

    def forward(self, source, target_in):
        memory, hidden = self.encoder(self.source_embedding(source))
        h = hidden[0]
        logits = []
        for t in range(target_in.shape[1]):  # teacher forcing: the true previous token in
            h = self.decoder(self.target_embedding(target_in[:, t]), h)
            features = h
            if self.attention:
                weights = torch.softmax((memory @ h.unsqueeze(-1)).squeeze(-1), -1)
                features = torch.cat([h, (weights.unsqueeze(-1) * memory).sum(1)], -1)
            logits.append(self.out(features))
        return torch.stack(logits, 1)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_seq2seq_gru_encoder_decoder_with_teacher_forcing(attention, mode):
    torch.manual_seed(0)
    model = Seq2Seq(attention).double()
    source, target = torch.randint(0, 9, (3, 7)), torch.randint(0, 9, (3, 5))
    target_in = torch.cat([torch.zeros(3, 1, dtype=torch.long), target[:, :-1]], 1)  # 0: start of sequence

    def run(m):
        logits = m(source, target_in)
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return [logits]

    def reference(m):
        feedback_rnn(m.encoder, LAM)
        feedback_cell(m.decoder, LAM)
        return m

    _check(model, run, mode, reference, loops=2)


# --- an LSTM tagger, and a BiLSTM-CRF trained through its loss method ---


class Tagger(nn.Module):
    def __init__(self, words: int = 11, tags: int = 4, size: int = 5):
        super().__init__()
        self.embedding = nn.Embedding(words, size)
        self.lstm = nn.LSTM(size, size)
        self.to_tags = nn.Linear(size, tags)

    def forward(self, sentence):
        return F.log_softmax(self.to_tags(self.lstm(self.embedding(sentence))[0]), -1)


@pytest.mark.parametrize("mode", MODES)
def test_lstm_tagger(mode):
    torch.manual_seed(0)
    model = Tagger().double()
    sentence, tags = torch.randint(0, 11, (6, 2)), torch.randint(0, 4, (6, 2))

    def run(m):
        scores = m(sentence)
        F.nll_loss(scores.flatten(0, 1), tags.flatten()).backward()
        return [scores]

    def reference(m):
        feedback_rnn(m.lstm, LAM)
        return m

    _check(model, run, mode, reference, loops=1)


class BiLSTMCRF(nn.Module):
    """Emission scores from a bidirectional LSTM, a linear-chain CRF on top; trained by
    ``neg_log_likelihood``, whose partition function is a recurrence over time."""

    def __init__(self, words: int = 11, tags: int = 4, size: int = 6):
        super().__init__()
        self.embedding = nn.Embedding(words, size)
        self.lstm = nn.LSTM(size, size // 2, bidirectional=True)
        self.to_tags = nn.Linear(size, tags)
        self.transitions = nn.Parameter(torch.randn(tags, tags))  # [from, to]
        self.start = nn.Parameter(torch.randn(tags))

    def forward(self, sentence):
        return self.to_tags(self.lstm(self.embedding(sentence))[0])

    def alpha_step(self, emission, alpha):
        return torch.logsumexp(alpha.unsqueeze(2) + self.transitions.unsqueeze(0), 1) + emission

    def neg_log_likelihood(self, sentence, tags):
        emissions = self(sentence)
        alpha = self.start + emissions[0]
        for t in range(1, emissions.shape[0]):
            alpha = self.alpha_step(emissions[t], alpha)
        gold = self.start[tags[0]] + emissions.gather(2, tags.unsqueeze(2)).squeeze(2).sum(0)
        gold = gold + self.transitions[tags[:-1], tags[1:]].sum(0)
        return (torch.logsumexp(alpha, -1) - gold).mean()


@pytest.mark.parametrize("mode", MODES)
def test_bilstm_crf_trained_through_its_loss_method(mode):
    torch.manual_seed(0)
    model = BiLSTMCRF().double()
    sentence, tags = torch.randint(0, 11, (6, 3)), torch.randint(0, 4, (6, 3))

    def run(m):
        loss = m.neg_log_likelihood(sentence, tags)
        loss.backward()
        return [loss]

    def reference(m):
        feedback_rnn(m.lstm, LAM)
        m.alpha_step = feedback_step(m.alpha_step, LAM)
        return m

    # the two directions of the LSTM and the CRF's forward recursion
    _check(model, run, mode, reference, loops=3, methods=("forward", "neg_log_likelihood"))


# --- two stacked LSTMCells stepped over a time series, one loop with four carries ---


class TwoCellForecaster(nn.Module):
    def __init__(self, size: int = 5):
        super().__init__()
        self.size = size
        self.lower = nn.LSTMCell(1, size)
        self.upper = nn.LSTMCell(size, size)
        self.head = nn.Linear(size, 1)

    def forward(self, series):
        batch = series.shape[0]
        h1, c1, h2, c2 = (series.new_zeros(batch, self.size) for _ in range(4))
        outputs = []
        for value in series.split(1, dim=1):
            h1, c1 = self.lower(value, (h1, c1))
            h2, c2 = self.upper(h1, (h2, c2))
            outputs.append(self.head(h2))
        return torch.cat(outputs, 1)


@pytest.mark.parametrize("mode", MODES)
def test_two_stacked_lstm_cells_on_a_time_series(mode):
    torch.manual_seed(0)
    model = TwoCellForecaster().double()
    series = torch.randn(3, 8, dtype=torch.float64)

    def run(m):
        predictions = m(series[:, :-1])
        F.mse_loss(predictions, series[:, 1:]).backward()
        return [predictions]

    if mode == "bptt":
        _check(model, run, mode, None, loops=1)
        return
    # One loop whose state is (h1, c1, h2, c2): within a step the upper cell reads the
    # lower one's new state, so DSF over this loop is not DSF over each cell on its own;
    # the reference is the literal δ recursion over the whole step.
    want_out, _ = _train(copy.deepcopy(model), run)
    compiled = dsf_compile.apply(copy.deepcopy(model), feedback=LAM, compiler="aot_eager")
    got_out, got = _train(compiled, run)
    assert rel_err(got_out[0], want_out[0]) <= 1e-12

    def step(value, h1, c1, h2, c2):
        h1, c1 = model.lower(value, (h1, c1))
        return (h1, c1, *model.upper(h1, (h2, c2)))

    def loss_of_states(states):
        predictions = torch.cat([model.head(s[2]) for s in states], 1)
        return F.mse_loss(predictions, series[:, 1:])

    params = list(model.parameters())
    xs = [(v,) for v in series[:, :-1].split(1, dim=1)]
    init = tuple(series.new_zeros(3, 5) for _ in range(4))
    _, want, _, _ = dsf_reference_loop(step, xs, init, LAM, loss_of_states, params)
    for (name, _), g, w in zip(compiled.named_parameters(), got, want):
        assert rel_err(g, w) <= 1e-9, f"{name}: relative error {rel_err(g, w):.3g}"
    report = dsf_compile.report(compiled)
    assert len(report.loops) == 1 and report.loops[0].state_size == 20 and not report.left_exact, report


# --- round 2: a QRNN's CPU loop, an LSTMCell under Highway-BP, loops the reports missed ---


def _sum_of_squares(*inputs):
    """A training step's ``run``: the model on ``inputs``, the sum of its squared outputs."""
    def run(m):
        out = m(*inputs)
        (out ** 2).sum().backward()
        return [out]

    return run


class QRNNLayer(nn.Module):
    """A quasi-recurrent layer driven as AWD-LSTM's code drives it on a CPU: every step's
    gates from one linear map, then a loop over ``(1, B, H)`` slices whose carried state
    starts as ``(1, B, H)`` and is viewed back to ``(B, H)`` at every step."""

    def __init__(self, n_in: int = 4, size: int = 5):
        super().__init__()
        self.size = size
        self.linear = nn.Linear(n_in, 3 * size)

    def step(self, gates, previous):
        kept, forget = gates
        return (kept + (1 - forget) * previous).view(kept.shape[1], self.size)

    def forward(self, x, hidden=None):
        candidate, forget, output = self.linear(x).chunk(3, dim=2)
        forget = torch.sigmoid(forget)
        kept = forget * torch.tanh(candidate)
        previous = x.new_zeros(1, x.shape[1], self.size) if hidden is None else hidden
        states = []
        for kept_t, forget_t in zip(kept.split(1, 0), forget.split(1, 0)):
            previous = self.step((kept_t, forget_t), previous)
            states.append(previous)
        cells = torch.stack(states)
        return torch.sigmoid(output) * cells, cells[-1:]


def _qrnn_run(x):
    def run(m):
        out, last = m(x)
        ((out ** 2).sum() + last.sum()).backward()
        return [out, last]

    return run


def _qrnn_reference(m):
    """DSF at λ = LAM: each step reads its previous state held constant, plus λ(s − sg(s))
    viewed as the step's new state (zero in value: the first step's (1, B, H) start too)."""
    def step(gates, previous):
        held = previous.detach()
        new = QRNNLayer.step(m, gates, held)
        return new + LAM * (previous - held).view_as(new)

    m.step = step
    return m


@pytest.mark.parametrize("mode", MODES)
def test_qrnn_loop_whose_state_starts_as_1_b_h(mode):
    """Its first step reshapes the carry: it runs as written and the loop starts at the
    second (the start has no gradient here, so DSF's parameter gradients are the whole
    loop's)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    _check(QRNNLayer().double(), _qrnn_run(x), mode, _qrnn_reference, loops=1)
    compiled = dsf_compile.apply(QRNNLayer().double(), mode, compiler="aot_eager")
    compiled(x)
    (loop,) = dsf_compile.report(compiled).loops
    assert loop.length == "5" and "first step run as written" in loop.note and "(1, 3, 5) → (3, 5)" in loop.note
    # another batch size: traced with B a symbol, which ``view(B, H)`` reads from the state
    wider = torch.randn(6, 4, 4, dtype=torch.float64)
    _check(QRNNLayer().double(), _qrnn_run(wider), mode, _qrnn_reference, loops=1)
    out, _ = compiled(wider)
    assert out.shape == (6, 4, 5) and dsf_compile.report(compiled).loops[0].batch.startswith("s")


def test_qrnn_loop_through_inductor_in_every_mode():
    torch.manual_seed(0)
    model, x = QRNNLayer(), torch.randn(6, 3, 4)
    want, _ = model(x)
    for mode, options in (("bptt", {}), ("ft", {}), ("dsf", {}), ("highway", {"iterations": 0})):
        compiled = dsf_compile.apply(copy.deepcopy(model), mode, **options)
        got, _ = compiled(x)
        assert got.shape == want.shape and rel_err(got.detach(), want.detach()) <= 1e-5, mode
        got.sum().backward()
        assert all(p.grad is not None for p in compiled.parameters()), mode


def test_highway_follows_a_residual_path_through_view_and_is_exact_where_j_is_k():
    """A QRNN step's Jacobian is its forget path, ``1 − f``: Highway-BP's diagonal K is all
    of it, so with no iteration its gradients are exact BPTT's."""
    torch.manual_seed(0)
    model, x = QRNNLayer().double(), torch.randn(6, 3, 4, dtype=torch.float64)
    want_out, want = _train(copy.deepcopy(model), _qrnn_run(x))
    compiled = dsf_compile.apply(copy.deepcopy(model), "highway", iterations=0, compiler="aot_eager")
    got_out, got = _train(compiled, _qrnn_run(x))
    assert all(rel_err(g, w) <= 1e-12 for g, w in zip(got_out, want_out))
    assert all(rel_err(g, w) <= 1e-10 for g, w in zip(got, want))
    assert dsf_compile.report(compiled).loops[0].feedback == "K on previous"


class CellForecaster(nn.Module):
    """One nn.LSTMCell stepped over a series (its state passed as the ``(h, c)`` tuple)."""

    def __init__(self, size: int = 5):
        super().__init__()
        self.size = size
        self.cell = nn.LSTMCell(1, size)
        self.head = nn.Linear(size, 1)

    def forward(self, series):
        h = c = series.new_zeros(series.shape[0], self.size)
        outputs = []
        for value in series.split(1, dim=1):
            h, c = self.cell(value, (h, c))
            outputs.append(self.head(h))
        return torch.cat(outputs, 1)


def test_highway_finds_the_forget_gate_of_an_lstm_cell_loop():
    from tests.reference import highway_reference_loop

    torch.manual_seed(0)
    model, series = CellForecaster().double(), torch.randn(3, 7, dtype=torch.float64)
    compiled = dsf_compile.apply(copy.deepcopy(model), "highway", iterations=1, compiler="aot_eager")
    F.mse_loss(compiled(series[:, :-1]), series[:, 1:]).backward()
    (loop,) = dsf_compile.report(compiled).loops
    assert loop.feedback == "K on c (0 on h)" and loop.carries == "h[5], c[5]"

    def step(value, h, c):
        return model.cell(value, (h, c))

    def forget_gate(value, h, c):  # K: the forget gate on c, 0 on h, from the cell's own formula
        gates = F.linear(value, model.cell.weight_ih, model.cell.bias_ih) + F.linear(
            h, model.cell.weight_hh, model.cell.bias_hh)
        return torch.zeros_like(h), torch.sigmoid(gates.chunk(4, -1)[1])

    def loss_of_states(states):
        return F.mse_loss(torch.cat([model.head(s[0]) for s in states], 1), series[:, 1:])

    xs = [(v,) for v in series[:, :-1].split(1, dim=1)]
    init = (series.new_zeros(3, 5), series.new_zeros(3, 5))
    params = list(model.parameters())
    _, want, _, _ = highway_reference_loop(step, forget_gate, xs, init, 1, loss_of_states, params)
    for (name, p), w in zip(compiled.named_parameters(), want):
        assert rel_err(p.grad, w) <= 1e-9, name


class BidirectionalCells(nn.Module):
    """A forward and a backward GRUCell loop over one input, their states concatenated."""

    def __init__(self, n_in: int = 3, size: int = 4):
        super().__init__()
        self.size = size
        self.forwards, self.backwards = nn.GRUCell(n_in, size), nn.GRUCell(n_in, size)

    def forward(self, x):
        h, ahead = x.new_zeros(x.shape[1], self.size), []
        for t in range(x.shape[0]):
            h = self.forwards(x[t], h)
            ahead.append(h)
        h, behind = x.new_zeros(x.shape[1], self.size), []
        for t in range(x.shape[0] - 1, -1, -1):
            h = self.backwards(x[t], h)
            behind.append(h)
        return torch.cat([torch.stack(ahead), torch.stack(behind[::-1])], -1)


def test_explain_lists_a_loop_running_backwards_beside_its_forward_twin():
    torch.manual_seed(0)
    model, x = BidirectionalCells().double(), torch.randn(5, 2, 3, dtype=torch.float64)
    explained = dsf_compile.explain(model, x)
    assert [(loop.direction, loop.name.split("'")[1]) for loop in explained.loops] == [
        ("forward", "forwards"), ("reverse", "backwards")]

    run = _sum_of_squares(x)

    def reference(m):
        feedback_cell(m.forwards, LAM)
        feedback_cell(m.backwards, LAM)
        return m

    for mode in MODES:
        _check(model, run, mode, reference, loops=2)


class TwoInlineLayers(nn.Module):
    """Two tanh layers written inline in one ``for`` over the layers: both loops run the
    same source line."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.input_weights = nn.ParameterList([nn.Parameter(0.5 * torch.randn(size, size)) for _ in range(2)])
        self.state_weights = nn.ParameterList([nn.Parameter(0.5 * torch.randn(size, size)) for _ in range(2)])

    def step(self, layer, x_t, h):
        return torch.tanh(x_t @ self.input_weights[layer] + h @ self.state_weights[layer])

    def forward(self, x):
        for layer in range(2):
            h, states = x.new_zeros(x.shape[1], x.shape[2]), []
            for t in range(x.shape[0]):
                h = self.step(layer, x[t], h)
                states.append(h)
            x = torch.stack(states)
        return x


@pytest.mark.parametrize("mode", MODES)
def test_two_loops_on_one_source_line_are_two_entries(mode):
    torch.manual_seed(0)
    model, x = TwoInlineLayers().double(), torch.randn(5, 2, 4, dtype=torch.float64)

    run = _sum_of_squares(x)

    def reference(m):
        plain = m.step
        m.step = lambda layer, x_t, h: feedback_step(lambda x_, h_: plain(layer, x_, h_), LAM)(x_t, h)
        return m

    _check(model, run, mode, reference, loops=2)
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    run(compiled)
    first, second = dsf_compile.report(compiled).loops
    assert first.source == second.source and second.name == first.name + " #2"


class Forecaster(nn.Module):
    """An LSTMCell over the observed series, then ``future`` steps each fed the previous
    prediction: a loop with no per-step input."""

    def __init__(self, size: int = 5):
        super().__init__()
        self.size = size
        self.cell = nn.LSTMCell(1, size)
        self.head = nn.Linear(size, 1)

    def observe(self, value, state):
        return self.cell(value, state)

    def generate(self, value, state):
        return self.cell(value, state)

    def forward(self, series, future: int = 0):
        state = (series.new_zeros(series.shape[0], self.size), series.new_zeros(series.shape[0], self.size))
        outputs = []
        for value in series.split(1, dim=1):
            state = self.observe(value, state)
            outputs.append(self.head(state[0]))
        for _ in range(future):
            state = self.generate(outputs[-1], state)
            outputs.append(self.head(state[0]))
        return torch.cat(outputs, 1)


@pytest.mark.parametrize("mode", MODES)
def test_a_generation_loop_with_no_per_step_input_is_left_exact_and_listed(mode):
    torch.manual_seed(0)
    model, series = Forecaster().double(), torch.randn(3, 6, dtype=torch.float64)

    run = _sum_of_squares(series, 4)

    def reference(m):  # DSF over the observed series only; generation stays exact
        m.observe = feedback_step(m.observe, LAM)
        return m

    want_out, eager = _train(copy.deepcopy(model), run)
    compiled = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager",
                                 **(dict(feedback=LAM) if mode == "dsf" else {}))
    got_out, got = _train(compiled, run)
    assert rel_err(got_out[0], want_out[0]) <= 1e-12
    want = eager if mode == "bptt" else _train(reference(copy.deepcopy(model)), run)[1]
    assert all(rel_err(g, w) <= 1e-9 for g, w in zip(got, want))
    report = dsf_compile.report(compiled)
    (loop,) = report.loops
    (left,) = report.left_exact
    lines, first = inspect.getsourcelines(Forecaster.forward)
    generating_line = first + next(i for i, line in enumerate(lines) if "self.generate(" in line)
    assert left.reason.startswith("no per-step input") and left.source.endswith(f"test_corpus.py:{generating_line}")
    assert loop.source != left.source
    # alone, it is what the report lists, and said so
    generating = dsf_compile.apply(copy.deepcopy(model), mode, compiler="aot_eager")
    with pytest.warns(UserWarning, match="rewrote no recurrent loop") as warned:
        generating(series[:, :1], 4)
    assert "no per-step input" in str(warned[0].message)
    assert len(dsf_compile.report(generating).left_exact) == 1


class DropoutInTheStep(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.cell = nn.GRUCell(3, 4)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h, states = x.new_zeros(x.shape[1], 4), []
        for t in range(x.shape[0]):
            h = self.cell(self.drop(x[t]), self.drop(h))
            states.append(h)
        return torch.stack(states)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_that_draws_nothing_does_not_keep_the_loop_exact(mode):
    torch.manual_seed(0)
    model, x = DropoutInTheStep(0.0).double(), torch.randn(5, 2, 3, dtype=torch.float64)

    run = _sum_of_squares(x)

    def reference(m):
        feedback_cell(m.cell, LAM)
        return m

    _check(model, run, mode, reference, loops=1)


class DecayingCells(nn.Module):
    """Two stacked decaying GRU-like cells over an irregular series (GRU-D's pattern): each
    step reads its slice of a (B, 4, T, F) input tensor (values, mask, time since the last
    observation, last observed value), applies dropout to the new states and writes a
    prediction into a preallocated output in place."""

    def __init__(self, features: int = 3, size: int = 4):
        super().__init__()
        self.size = size
        self.decay_input = nn.Linear(features, features)
        self.decay_state = nn.ModuleList([nn.Linear(features, size) for _ in range(2)])
        self.gates = nn.ModuleList([nn.Linear(2 * features + size, 2 * size),
                                    nn.Linear(features + 2 * size, 2 * size)])
        self.candidate = nn.ModuleList([nn.Linear(2 * features + size, size),
                                        nn.Linear(features + 2 * size, size)])
        self.head = nn.Linear(size, 1)
        self.drop = nn.Dropout(0.3)

    def cell(self, i, x, mask, delta, h):
        h = torch.exp(-torch.relu(self.decay_state[i](delta))) * h
        z, r = torch.sigmoid(self.gates[i](torch.cat((x, h, mask), -1))).chunk(2, -1)
        tilde = torch.tanh(self.candidate[i](torch.cat((x, r * h, mask), -1)))
        return (1 - z) * h + z * tilde

    def forward(self, inputs):
        batch, _, steps, _ = inputs.shape
        h1 = h2 = inputs.new_zeros(batch, self.size)
        predictions = inputs.new_zeros(batch, steps, 1)
        for t in range(steps):
            x, mask, delta, last = (torch.squeeze(inputs[:, :, t : t + 1, :][:, i], 1) for i in range(4))
            decay = torch.exp(-torch.relu(self.decay_input(delta)))
            x = mask * x + (1 - mask) * decay * last
            h1 = self.drop(self.cell(0, x, mask, delta, h1))
            h2 = self.drop(self.cell(1, h1, mask, delta, h2))
            predictions[:, t : t + 1, :] = torch.unsqueeze(self.head(h2), 1)
        return predictions


def test_a_loop_left_exact_is_one_entry_with_every_true_reason():
    torch.manual_seed(0)
    model, inputs = DecayingCells().double(), torch.rand(2, 4, 5, 3, dtype=torch.float64)
    report = dsf_compile.explain(model, inputs)
    (entry,) = report.left_exact
    assert not report.loops
    assert "draws random numbers (dropout)" in entry.reason and "in place (setitem)" in entry.reason
    assert entry.what == "loop over inputs"
    want = model(inputs)
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="rewrote no recurrent loop in this model: the loops it found are left exact"):
        got = compiled(inputs)
    assert got.shape == want.shape
    assert [e.reason for e in dsf_compile.report(compiled).left_exact] == [entry.reason]


def test_a_rewrite_that_would_change_an_output_is_undone_and_reported(monkeypatch):
    """The net under every rewrite: without the first-step peel, the QRNN loop's rewrite
    returned (T, 1, B, H) for eager's (T, B, H).  The graph's outputs are checked against
    what Dynamo traced: the loop is left exact, with the mismatch as its reason."""
    from dsf_compile.passes import find_python_loops

    monkeypatch.setattr(find_python_loops, "_peel_a_reshaping_first_step",
                        lambda segments, check, families: (segments, check, ""))
    torch.manual_seed(0)
    model, x = QRNNLayer().double(), torch.randn(6, 3, 4, dtype=torch.float64)
    want_out, want = _train(copy.deepcopy(model), _qrnn_run(x))
    compiled = dsf_compile.apply(copy.deepcopy(model), compiler="aot_eager")
    with pytest.warns(UserWarning, match="rewrote no recurrent loop"):
        got_out, got = _train(compiled, _qrnn_run(x))
    assert all(g.shape == w.shape and rel_err(g, w) <= 1e-12 for g, w in zip(got_out, want_out))
    assert all(rel_err(g, w) <= 1e-12 for g, w in zip(got, want))
    (entry,) = dsf_compile.report(compiled).left_exact
    assert "would change output 0 from (6, 3, 5) torch.float64 to (6, 6, 3, 5)" in entry.reason
