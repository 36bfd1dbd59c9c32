"""The literal DSF reference of DESIGN.md §1, written independently of the library.

Forward: step by step.  Backward: per-step autograd with the carried state held
constant, and the δ recursion written out as a Python loop, layer by layer from the top.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def cell(kind: str, x, state, w_ih, w_hh, b_ih, b_hh):
    """One step of the cell behind ``kind``; ``state`` is concat(h, c) for LSTM."""
    gi = x @ w_ih.T + (0 if b_ih is None else b_ih)
    if kind == "lstm":
        h, c = state.chunk(2, -1)
        gates = gi + h @ w_hh.T + (0 if b_hh is None else b_hh)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], -1)
    gh = state @ w_hh.T + (0 if b_hh is None else b_hh)
    if kind == "gru":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * state
    pre = gi + gh
    return torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)


def kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    return "rnn_" + module.nonlinearity


WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def layer_weights(params: dict, layer: int, direction: int) -> list:
    """(w_ih, w_hh, b_ih, b_hh) of one (layer, direction) of an nn.RNN/GRU/LSTM, None
    where the module has no bias."""
    return [params.get(name + _suffix(layer, direction)) for name in WEIGHT_NAMES]


def dsf_reference(module: nn.RNNBase, x, h0, lams, loss_fn, dropout_masks=None):
    """Forward outputs and DSF gradients of ``loss_fn(output, h_n[, c_n])``.

    ``h0``: None, a tensor, or (h0, c0) for LSTM.  ``lams``: one λ per (layer, direction),
    layer-major.  ``dropout_masks[l]`` multiplies the input of layer l + 1 (default: 1).
    Returns (outputs, grads) with grads keyed by parameter name, "x" and "h0"/"c0".
    """
    kind = kind_of(module)
    L, H = module.num_layers, module.hidden_size
    D = 2 if module.bidirectional else 1
    if module.batch_first:
        x = x.transpose(0, 1)
    T, B = x.shape[:2]
    zeros = x.new_zeros(L * D, B, H)
    if kind == "lstm":
        h_init, c_init = h0 if h0 is not None else (zeros, zeros)
        init = torch.cat([h_init, c_init], -1)
    else:
        init = h0 if h0 is not None else zeros
    params = dict(module.named_parameters())

    def weights(layer, d):
        return layer_weights(params, layer, d)

    def order(d):
        return range(T - 1, -1, -1) if d else range(T)

    # forward, recording every state and the state each step consumed
    inputs, states, prevs = [], {}, {}
    layer_in = x.detach()
    with torch.no_grad():
        for layer in range(L):
            inputs.append(layer_in)
            outs = []
            for d in range(D):
                s = init[layer * D + d]
                seq = [None] * T
                prev = [None] * T
                for t in order(d):
                    prev[t] = s
                    s = cell(kind, layer_in[t], s, *weights(layer, d))
                    seq[t] = s
                states[layer, d], prevs[layer, d] = seq, prev
                outs.append(torch.stack(seq)[..., :H])
            layer_in = torch.cat(outs, -1)
            if layer < L - 1 and dropout_masks is not None:
                layer_in = layer_in * dropout_masks[layer]

    # direct gradients from the loss
    out = layer_in.clone().requires_grad_()
    finals = [states[ld][T - 1 if ld[1] == 0 else 0] for ld in sorted(states)]
    final = torch.stack(finals).clone().requires_grad_()
    user_out = out.transpose(0, 1) if module.batch_first else out
    extra = (final[..., H:],) if kind == "lstm" else ()
    loss = loss_fn(user_out, final[..., :H], *extra)
    g_out, g_final = torch.autograd.grad(loss, [out, final], allow_unused=True)
    g_out = torch.zeros_like(out) if g_out is None else g_out
    g_final = torch.zeros_like(final) if g_final is None else g_final

    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    g_init = torch.zeros_like(init)
    g_layer_out = g_out
    for layer in reversed(range(L)):
        g_in = torch.zeros_like(inputs[layer])
        for d in range(D):
            idx = layer * D + d
            w = [p for p in weights(layer, d) if p is not None]
            lam = lams[idx].to(x.dtype)
            g = [torch.zeros_like(init[idx]) for _ in range(T)]
            for t in range(T):
                g[t] = g[t].clone()
                g[t][:, :H] += g_layer_out[t][:, d * H : (d + 1) * H]
            g[T - 1 if d == 0 else 0] = g[T - 1 if d == 0 else 0] + g_final[idx]
            delta = [None] * T
            nxt = None
            for t in reversed(list(order(d))):
                delta[t] = g[t] if nxt is None else g[t] + lam * nxt
                nxt = delta[t]
            for t in range(T):
                x_t = inputs[layer][t].clone().requires_grad_()
                with torch.enable_grad():
                    new = cell(kind, x_t, prevs[layer, d][t], *weights(layer, d))
                    found = torch.autograd.grad(new, [x_t, *w], delta[t])
                g_in[t] += found[0]
                sfx = _suffix(layer, d)
                for name, gw in zip([n + sfx for n in WEIGHT_NAMES if params.get(n + sfx) is not None], found[1:]):
                    grads[name] += gw
            g_init[idx] = lam * delta[0 if d == 0 else T - 1]
        if layer > 0 and dropout_masks is not None:
            g_in = g_in * dropout_masks[layer - 1]
        g_layer_out = g_in
    grads["x"] = g_layer_out.transpose(0, 1) if module.batch_first else g_layer_out
    if kind == "lstm":
        grads["h0"], grads["c0"] = g_init[..., :H], g_init[..., H:]
    else:
        grads["h0"] = g_init
    outputs = (user_out.detach(), final[..., :H].detach(), *(e.detach() for e in extra))
    return outputs, grads


def _run_loop(step, xs, init, loss_of_states, params):
    """The loop's states, the state each step consumed, the direct gradients ``g_t`` over
    the concatenated carries, and the gradients of parameters the loss uses directly."""
    states, prev = [], []
    s = tuple(c.detach() for c in init)
    with torch.no_grad():
        for x in xs:
            prev.append(s)
            s = tuple(step(*x, *s))
            states.append(s)
    leaves = [tuple(c.clone().requires_grad_() for c in st) for st in states]
    loss = loss_of_states(leaves)
    flat = [c for st in leaves for c in st]
    found = torch.autograd.grad(loss, flat + list(params), allow_unused=True)
    g = [torch.zeros_like(c) if d is None else d for c, d in zip(flat, found)]
    # parameters the loss uses directly (a head after the loop)
    grads = [torch.zeros_like(p) if d is None else d.clone() for p, d in zip(params, found[len(flat) :])]
    n = len(init)
    direct = [torch.cat(g[t * n : (t + 1) * n], -1) for t in range(len(xs))]
    return states, prev, direct, grads


def _local_vjps(step, xs, prev, delta, params, grads):
    """Each step's VJP with δ_t, its carried input held constant: adds the parameter
    gradients to ``grads``, returns each x's (its floating tensors: not token ids, masks)."""
    x_grads = []
    for t, x in enumerate(xs):
        x_leaf = tuple(v.clone().requires_grad_(v.is_floating_point()) for v in x)
        wrt = [v for v in x_leaf if v.requires_grad]
        with torch.enable_grad():
            new = torch.cat(step(*x_leaf, *prev[t]), -1)
            found = torch.autograd.grad(new, [*wrt, *params], delta[t], allow_unused=True)
        x_grads.append(found[: len(wrt)])
        for i, d in enumerate(found[len(wrt) :]):
            if d is not None:
                grads[i] += d
    return x_grads


def dsf_reference_loop(step, xs, init, lam, loss_of_states, params):
    """DSF gradients of ``loss_of_states(states)`` for a loop ``s_t = step(x_t, s_{t-1})``.

    ``xs``: per-step inputs in iteration order (each a tuple of tensors); ``init``: the
    initial carries (tuple); ``states[t]`` is the tuple of carries after step t; λ is over
    the carries concatenated in order.  Returns grads for ``params``, each x (its floating
    tensors: token ids and masks have none), and init.
    """
    states, prev, direct, grads = _run_loop(step, xs, init, loss_of_states, params)
    sizes = [c.shape[-1] for c in init]
    delta = [None] * len(xs)
    nxt = None
    for t in reversed(range(len(xs))):
        delta[t] = direct[t] if nxt is None else direct[t] + lam * nxt
        nxt = delta[t]
    x_grads = _local_vjps(step, xs, prev, delta, params, grads)
    init_grad = (lam * delta[0]).split(sizes, -1)
    return states, grads, x_grads, init_grad


def highway_reference_loop(step, decay_of, xs, init, iterations, loss_of_states, params):
    """Highway-BP gradients of ``loss_of_states(states)`` for ``s_t = step(x_t, s_{t-1})``,
    written out step by step (DESIGN.md §7).

    ``decay_of(*x_t, *s_{t-1})`` is the step's highway diagonal K over the concatenated
    carries, written by the caller from the cell's formula (not found in a graph).
    ``J_tᵀ w`` is per-step autograd.  Returns what :func:`dsf_reference_loop` returns;
    the initial carries get ``J_1ᵀ δ_1``.
    """
    T = len(xs)
    sizes = [c.shape[-1] for c in init]
    states, prev, direct, grads = _run_loop(step, xs, init, loss_of_states, params)
    with torch.no_grad():
        K = [torch.cat([torch.as_tensor(k) for k in decay_of(*xs[t], *prev[t])], -1) for t in range(T)]

    def transposed(t, w):
        carried = tuple(c.clone().requires_grad_() for c in prev[t])
        with torch.enable_grad():
            new = torch.cat(step(*xs[t], *carried), -1)
            return torch.cat(torch.autograd.grad(new, carried, w), -1)

    def scan(u):
        w = [None] * T
        for t in reversed(range(T)):
            w[t] = u[t] if t == T - 1 else u[t] + K[t + 1] * w[t + 1]
        return w

    w = scan(direct)
    for _ in range(iterations):
        v = [transposed(t + 1, w[t + 1]) - K[t + 1] * w[t + 1] if t < T - 1 else torch.zeros_like(w[t])
             for t in range(T)]
        w = scan([direct[t] + v[t] for t in range(T)])
    x_grads = _local_vjps(step, xs, prev, w, params, grads)
    init_grad = transposed(0, w[0]).split(sizes, -1)
    return states, grads, x_grads, init_grad


# DSF as autograd sees it: a second, independent form of the reference.  Each step reads
# its previous state held constant, and its new state adds λ ⊙ (s − sg(s)), zero in value
# with derivative λ: so ∂s_t/∂s_{t-1} = diag(λ), every local VJP is taken at the exact
# states, and plain autograd on the patched model gives DSF's gradients for the whole
# model around the loop (heads, embeddings, other loops) with no δ recursion written out.


def _held_and_kept(state, lam):
    if isinstance(state, (tuple, list)):
        pairs = [_held_and_kept(s, lam) for s in state]
        return type(state)(p[0] for p in pairs), type(state)(p[1] for p in pairs)
    held = state.detach()
    return held, lam * (state - held)


def _plus(a, b):
    if isinstance(a, (tuple, list)):
        return type(a)(_plus(x, y) for x, y in zip(a, b))
    return a + b


def feedback_step(step, lam: float, state_at: int | None = None):
    """``step(x, state)`` (a cell's forward, a hand-written step function) with DSF's
    gradients at a constant λ.  ``state_at``: where the new state is in the step's result
    when the result also holds per-step outputs (those keep their exact gradients)."""

    def fed_back(x, state):
        held, kept = _held_and_kept(state, lam)
        cut = step(x, held)
        if state_at is None:
            return _plus(cut, kept)
        full = step(x, state)
        return tuple(_plus(cut[i], kept) if i == state_at else r for i, r in enumerate(full))

    return fed_back


def feedback_cell(cell: nn.Module, lam: float, state_at: int | None = None) -> nn.Module:
    """``cell`` (in place) computing :func:`feedback_step` of its own forward."""
    cell.forward = feedback_step(type(cell).forward.__get__(cell), lam, state_at)
    return cell


def feedback_rnn(module: nn.RNNBase, lam: float) -> nn.RNNBase:
    """``module`` (nn.RNN/GRU/LSTM, in place) stepping :func:`cell` with DSF's gradients
    at a constant λ: layers, directions, ``batch_first`` and the dropout between layers
    (drawn where torch draws it) as torch's module does them."""
    kind = kind_of(module)
    params = dict(module.named_parameters())
    L, H = module.num_layers, module.hidden_size
    D = 2 if module.bidirectional else 1

    def forward(x, hx=None):
        if module.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[:2]
        zeros = x.new_zeros(L * D, B, H)
        if kind == "lstm":
            init = torch.cat(hx if hx is not None else (zeros, zeros), -1)
        else:
            init = hx if hx is not None else zeros
        finals, layer_in = [], x
        for layer in range(L):
            outs = []
            for d in range(D):
                w = layer_weights(params, layer, d)
                step = feedback_step(lambda x_t, s, w=w: cell(kind, x_t, s, *w), lam)
                s, seq = init[layer * D + d], [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    s = seq[t] = step(layer_in[t], s)
                finals.append(s)
                outs.append(torch.stack(seq)[..., :H])
            layer_in = torch.cat(outs, -1)
            if layer < L - 1 and module.dropout and module.training:
                layer_in = nn.functional.dropout(layer_in, module.dropout, True)
        final = torch.stack(finals)
        out = layer_in.transpose(0, 1) if module.batch_first else layer_in
        return (out, (final[..., :H], final[..., H:])) if kind == "lstm" else (out, final)

    module.forward = forward
    return module
