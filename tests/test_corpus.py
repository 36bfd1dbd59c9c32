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
