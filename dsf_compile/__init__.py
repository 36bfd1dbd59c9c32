"""dsf-compile: train recurrent networks with Diagonal State Feedbacks instead of BPTT.

``dsf_compile.apply(model)`` compiles a model in place through a torch.compile backend
that finds its recurrent loops and rewrites their backward pass (DESIGN.md §1–3).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .backend import DSFBackend, DSFError, UnsupportedLoopError
from .feedback import Feedback, FeedbackError
from .fidelity import Fidelity, ParameterFidelity, compare_gradients
from .loop_backward import LoopBackward
from .loop_ir import LeftExact, LoopIR
from .ops import loop_states, reverse_linear_scan
from .packed import PackedCalls
from .passes.provenance import CALL_SITE, users_frame, warn_at_user, where_called
from .report import LoopReport, Report
from .rules import RULES, Rule, register_rule
from .traced_rnn import opaque_rnn_calls

RECOMPILE_LIMIT = 64

__all__ = [
    "DSFBackend",
    "DSFError",
    "Feedback",
    "FeedbackError",
    "Fidelity",
    "LeftExact",
    "LoopBackward",
    "LoopIR",
    "LoopReport",
    "ParameterFidelity",
    "RULES",
    "Report",
    "Rule",
    "UnsupportedLoopError",
    "apply",
    "backend",
    "explain",
    "gradient_fidelity",
    "loop_states",
    "register_rule",
    "report",
    "reverse_linear_scan",
]


def backend(
    mode: str | Rule = "dsf",
    feedback: Feedback = "linspace",
    *,
    seed: int = 0,
    strict: bool = False,
    compiler: str = "inductor",
    **options: Any,
) -> DSFBackend:
    """A backend for ``torch.compile(fn, backend=dsf_compile.backend(...))``, with
    :func:`apply`'s options.

    Call the compiled function inside :func:`recurrent_ops_visible` (or set
    ``torch._dynamo.config.allow_rnn = True``) so that nn.RNN/GRU/LSTM reach it;
    :func:`apply` does this for you.
    """
    return DSFBackend(mode, feedback, seed=seed, strict=strict, compiler=compiler, **options)


@contextlib.contextmanager
def recurrent_ops_visible():
    """A context in which Dynamo traces nn.RNN/GRU/LSTM into the graph instead of running
    them eagerly behind a graph break (its default, DESIGN.md §6).

    It also raises Dynamo's per-function recompile limit (every model of one class shares
    its ``forward``'s cache; a Python loop recompiles for every new length) and makes
    hitting it an error instead of Dynamo's silent eager run, i.e. exact gradients instead
    of the mode asked for: :func:`apply`'s forward turns that error into a loud eager call.
    Python floats are constants of the graph (``specialize_float``): a model built with
    another dropout than an earlier one of its class must not turn the rate into a graph
    input, which the rewrites need as a number.  The modules' fused ops are traced as one
    opaque op (:mod:`dsf_compile.traced_rnn`), so that the sequence length stays a size
    Dynamo can make dynamic instead of a constant.
    """
    with torch._dynamo.config.patch(
        allow_rnn=True, recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True, specialize_float=True
    ), opaque_rnn_calls():
        yield


def _compile_method(model: nn.Module, name: str, dsf_backend: DSFBackend, dynamic: bool | None):
    # The class's own method, taking the model as its first argument: Dynamo skips the
    # bound ``_call_impl`` of a bare torch.nn module (``nn.GRU(...).compile()`` silently
    # runs eagerly), an applied model's method is our wrapper, and a copy of the model
    # (``copy.deepcopy``) must run with its own parameters, not the original's.
    forward = getattr(type(model), name)
    # An earlier plain torch.compile of this class may have marked its forward "skip"
    # (nn.GRU breaks the graph inside a loop over layers without allow_rnn), which would
    # make this compile silently run eagerly.  Other compiled models of the class only
    # lose their cache entries and recompile.
    torch._C._dynamo.eval_frame.reset_code(forward.__code__)
    return torch.compile(forward, backend=dsf_backend, dynamic=dynamic)


class _GraphBreaks:
    """Collects the reasons of the graph breaks Dynamo takes while the block runs.  Dynamo
    counts some under "graph_break" and others (data-dependent branching: a loop with a
    ``break`` on a tensor's value) only under "unimplemented"."""

    def __enter__(self) -> list[str]:
        from torch._dynamo.utils import counters

        self._counters = [counters["graph_break"], counters["unimplemented"]]
        self._before = [dict(counter) for counter in self._counters]
        self.reasons: list[str] = []
        return self.reasons

    def __exit__(self, *exc) -> None:
        for counter, before in zip(self._counters, self._before):
            for reason, count in counter.items():
                if count <= before.get(reason, 0):
                    continue
                summary = " ".join(line.strip() for line in str(reason).splitlines()[:2] if line.strip())
                if "dsf_packed_rnn_call" in summary:
                    continue  # our own packed calls: run outside the graphs on purpose, with the rule
                if summary not in self.reasons:
                    self.reasons.append(summary)


@contextlib.contextmanager
def _our_errors_unwrapped():
    """Dynamo wraps errors raised in a backend; ours (bad λ, strict mode) are the user's
    to read, so re-raise them as they are."""
    try:
        yield
    except Exception as error:
        inner = getattr(error, "inner_exception", None)
        if isinstance(inner, (DSFError, FeedbackError)):
            raise inner from inner.__cause__  # the user's own exception, if any, stays attached
        raise


class _CompiledForward:
    """Replaces ``model.forward`` (or another method named in ``apply``): runs the compiled
    method with recurrent ops visible to Dynamo, surfaces our own errors unwrapped, and
    warns once when the model turned out to hold no loop to rewrite."""

    def __init__(self, model: nn.Module, name: str, compiled, dsf_backend: DSFBackend, dynamic: bool | None) -> None:
        self.compiled_model, self.name, self.compiled, self.backend = model, name, compiled, dsf_backend
        self.dynamic, self._checked = dynamic, False
        self._packed = PackedCalls(model, "", dsf_backend) if isinstance(model, nn.RNNBase) and name == "forward" \
            else None

    def __deepcopy__(self, memo: dict) -> _CompiledForward:
        # the copy runs its own model through the same compiled function (Dynamo guards
        # on the model, so it gets its own graphs) and reports to the same backend
        model = copy.deepcopy(self.compiled_model, memo)
        return _CompiledForward(model, self.name, self.compiled, self.backend, self.dynamic)

    def __reduce__(self):
        # torch.save(model): compiled code does not pickle; the loaded model compiles
        # its method again, with a backend of the same options
        return _compiled_again, (self.compiled_model, self.name, self.backend, self.dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._packed is not None and args and isinstance(args[0], PackedSequence):
            return self._packed(*args, **kwargs)  # an applied nn.GRU called on a packed batch
        if torch.compiler.is_compiling():
            # called from another compiled method (a loss method calling self(...)): traced
            # into the caller's graph, whose loops the backend sees together
            return self._original(*args, **kwargs)
        site = CALL_SITE.set(where_called())  # the source of loops whose nodes hold no frame of the user's
        try:
            with _our_errors_unwrapped(), recurrent_ops_visible(), _GraphBreaks() as breaks, self.backend.running():
                out = self.compiled(self.compiled_model, *args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            return self._run_eagerly(error, args, kwargs)
        finally:
            CALL_SITE.reset(site)
        self.backend.graph_breaks.extend(b for b in breaks if b not in self.backend.graph_breaks)
        # judged at the first call that trains: one without gradients runs no backward (and a
        # packed call runs torch's own op then), so it cannot tell whether a loop will be rewritten
        if not self._checked and torch.is_grad_enabled():
            self._checked = True
            self._warn_if_nothing_found()
        return out

    def _run_eagerly(self, error: Exception, args: tuple, kwargs: dict) -> Any:
        """The model's own forward, uncompiled, said loudly: Dynamo will compile no more
        graphs for this forward (its recompile limit is hit, typically by many sequence
        lengths), so this call trains with exact gradients whatever the mode."""
        reason = (
            f"Dynamo's recompile limit ({RECOMPILE_LIMIT} graphs for "
            f"{type(self.compiled_model).__name__}.{self.name}) is hit, "
            "so calls that need a new graph (a new sequence length, a new model of the class) run eagerly; "
            "pad or bucket sequence lengths to a few values"
        )
        if reason not in self.backend.eager_calls:
            self.backend.eager_calls.append(reason)
            last = " ".join(str(error).split())[:300]
            warn_at_user(f"dsf_compile: this call runs eagerly with exact gradients: {reason} ({last})")
        with self.backend.running(accounted=True):
            return self._original(*args, **kwargs)

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own method, uncompiled."""
        return getattr(type(self.compiled_model), self.name)(self.compiled_model, *args, **kwargs)

    def _warn_if_nothing_found(self) -> None:
        report = self.backend.report
        if report.loops:
            return
        found = ("rewrote no recurrent loop in this model: the loops it found are left exact (below)"
                 if report.left_exact else "found no recurrent loop in this model")
        details = "\n" + str(report) if report.left_exact or report.graph_breaks else ""
        if self.backend.strict:
            raise UnsupportedLoopError(f"dsf_compile {found}, so the model would train with ordinary exact "
                                       f"gradients (strict=True refuses that; strict=False allows it).{details}")
        warn_at_user(f"dsf_compile {found}, so it trains with ordinary exact gradients.{details}")


def apply(
    model: nn.Module,
    mode: str | Rule = "dsf",
    feedback: Feedback = "linspace",
    *,
    seed: int = 0,
    strict: bool = False,
    compiler: str = "inductor",
    dynamic: bool | None = None,
    methods: Sequence[str] = ("forward",),
    **options: Any,
) -> nn.Module:
    """Compile ``model`` in place so that its recurrent loops train with ``mode``.

    ``mode`` names a backward rule of :data:`dsf_compile.RULES`, with its options given by
    name: ``"dsf"`` (diagonal state feedback), ``"ft"`` (fully truncated, λ = 0),
    ``"highway"`` (Highway-BP: ``iterations`` refinements, default 1, of a backward whose
    diagonal is each step's own residual path — a GRU's update gate, an LSTM's forget gate;
    after k of them the last k+1 steps' gradients are exact, DESIGN.md §7), ``"tbptt"``
    (truncated BPTT: every loss term through its last ``window`` transitions), ``"auto"``
    (Highway-BP with the fewest refinements whose measured gradient cosine to BPTT reaches
    ``target``, default 0.99, measured every ``every`` backward passes) or ``"bptt"`` (exact
    gradients); or it is a :class:`Rule` object, a rule of one's own.  ``feedback`` sets
    λ per loop for ``"dsf"``: ``"linspace"`` (λ = linspace(0, 1, state size), the paper's
    choice), ``"uniform"`` (U[0, 1) drawn from ``seed``, different per loop),
    ``"adaptive"`` (λ = clip(mean over steps and rows of the step Jacobian's diagonal, 0,
    1), estimated at every backward with one Rademacher probe and smoothed across steps by
    ``momentum``, default 0.9), a float, a 1-D tensor (for every loop of that state size)
    or a callable ``LoopIR -> λ``.  An option the mode does not read is refused.
    When the first call with gradients enabled finds no loop to rewrite, it warns (calls under
    ``torch.no_grad()`` train nothing and are not judged); ``strict=True`` makes that, and
    anything that would be left exact, an error.  ``compiler``:
    ``"inductor"``, or ``"aot_eager"`` to run the rewritten graphs without code generation
    (fast to build; debugging, tests).
    ``dynamic`` is passed to ``torch.compile``.  ``methods``: the methods training runs
    through, each compiled (a tagger trained by ``model.neg_log_likelihood(...)`` needs
    ``methods=("forward", "neg_log_likelihood")``); a recurrent module (nn.RNN/GRU/LSTM or
    an nn.*Cell) that trains outside them runs eagerly with exact gradients, which is
    warned about and listed in ``report().eager_calls``.  Parameter names and
    ``state_dict`` keys are unchanged; the same object is returned.  See :func:`report`
    for what was rewritten.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dsf_compile.apply takes an nn.Module (the model to train), not {type(model).__name__}")
    if getattr(model, "_dsf_backend", None) is not None:
        raise ValueError(f"this model is already applied (mode={model._dsf_backend.mode!r}); apply once, to the "
                         "model as written: for another mode, apply to a fresh copy of it (copy.deepcopy before "
                         "the first apply)")
    dsf_backend = backend(mode, feedback, seed=seed, strict=strict, compiler=compiler, **options)
    for name in methods:
        if not callable(getattr(type(model), name, None)):
            raise ValueError(f"methods: {type(model).__name__} has no method {name!r}")
    for name in methods:
        setattr(model, name, _compiled_again(model, name, dsf_backend, dynamic))
    for path, module in model.named_modules():
        # (the model itself is called through its compiled forward: its hooks run before it)
        if path and isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            module.register_forward_pre_hook(_OutsideCallCheck(dsf_backend, path, methods))
        if path and isinstance(module, nn.RNNBase):
            module.forward = PackedCalls(module, path, dsf_backend)  # Dynamo cannot trace a packed call
    model._dsf_backend = dsf_backend
    return model


def _compiled_again(model: nn.Module, name: str, dsf_backend: DSFBackend, dynamic: bool | None) -> _CompiledForward:
    return _CompiledForward(model, name, _compile_method(model, name, dsf_backend, dynamic), dsf_backend, dynamic)


class _OutsideCallCheck:
    """A forward pre-hook on a recurrent module: training it outside the compiled methods
    (another method calling it directly), or inside one but outside its graph (a graph
    break, FSDP's hooks on the module), runs it eagerly, with exact gradients whatever the
    mode; say so instead of leaving the report's word for it."""

    def __init__(self, dsf_backend: DSFBackend, path: str, methods: Sequence[str]) -> None:
        self.backend, self.path, self.methods = dsf_backend, path, tuple(methods)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or self.backend.is_accounted or not torch.is_grad_enabled():
            return
        if args and isinstance(args[0], PackedSequence) and isinstance(module, nn.RNNBase):
            return  # a packed call: trained with the rule by PackedCalls, not eagerly
        if not any(p.requires_grad for p in module.parameters()):
            return
        what = f"{self.path!r} ({type(module).__name__})"
        if self.backend.is_running:  # in a compiled method, yet not in its graph
            reason = (
                f"{what} ran eagerly inside the compiled method(s) {', '.join(self.methods)}: a graph break "
                "(report().graph_breaks) left it out of the graph, so it trains with exact gradients; remove "
                f"the break (a torch.compiler.disable'd function, a call Dynamo skips), or apply dsf_compile to "
                f"{self.path!r} itself"
            )
        else:
            caller = _calling_method(module)
            reason = (
                f"{what} ran outside the compiled method(s) {', '.join(self.methods)}"
                f"{f', called from {caller!r}' if caller else ''}: it trains with exact gradients; "
                f"pass methods=(..., {caller or 'the method that calls it'!r}) to dsf_compile.apply"
            )
        if reason not in self.backend.eager_calls:
            self.backend.eager_calls.append(reason)
            warn_at_user(f"dsf_compile: {reason}")


def _calling_method(module: nn.Module) -> str | None:
    """The name of the user's function that called ``module``."""
    frame = users_frame()
    return None if frame is None else frame.f_code.co_name


def report(model: nn.Module) -> Report:
    """What :func:`apply` found and rewrote in ``model`` so far (after its first call)."""
    dsf_backend = getattr(model, "_dsf_backend", None)
    if dsf_backend is None:
        raise ValueError("this model was not compiled with dsf_compile.apply")
    return dsf_backend.report


def gradient_fidelity(model: nn.Module, closure: Callable[[], Tensor]) -> Fidelity:
    """How close the gradients of an applied ``model``'s mode are to exact BPTT's on one batch.

    ``closure()`` runs the model and returns the loss (without calling ``backward``).  It
    is called twice: through the model's compiled methods, then through the same methods
    compiled in exact mode (``mode="bptt"``: the same forward kernels, differentiated
    exactly), with the random number generators, the model's buffers and what the rule
    keeps between backward passes (adaptive λ estimates, auto's measurements) set back,
    so both see the same dropout masks and nothing of the model
    changes; ``.grad`` is not touched.  Returns the per-parameter cosine and relative
    error of the mode's gradient against the exact one (:class:`Fidelity`).
    """
    dsf_backend = getattr(model, "_dsf_backend", None)
    if dsf_backend is None:
        raise ValueError("gradient_fidelity needs a model compiled with dsf_compile.apply")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("gradient_fidelity: the model has no trainable parameter")
    names, params = zip(*trainable)
    applied = {name: f for name, f in vars(model).items() if isinstance(f, _CompiledForward)}
    exact = model.__dict__.setdefault("_dsf_exact_methods", {})
    for name, method in applied.items():
        if name not in exact:
            exact_backend = backend("bptt", compiler=dsf_backend.compiler)
            # no reset of the method's code: the mode's graphs stay cached beside these
            compiled = torch.compile(getattr(type(model), name), backend=exact_backend, dynamic=method.dynamic)
            exact[name] = _CompiledForward(model, name, compiled, exact_backend, method.dynamic)
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    kept = dsf_backend.rule.snapshot()  # what the rule keeps between backward passes

    def gradients() -> list[Tensor | None]:
        with torch.random.fork_rng(devices=devices):
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError("gradient_fidelity: the closure must return the loss, a one-element tensor")
            found = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        return list(found)

    try:
        got = gradients()
        dsf_backend.rule.restore(kept)
        with dsf_backend.running(accounted=True):
            model.__dict__.update(exact)
            want = gradients()
    finally:
        model.__dict__.update(applied)
    return compare_gradients(dsf_backend.mode, list(names), got, want)


def explain(
    model: nn.Module,
    *example_args: Any,
    mode: str | Rule = "dsf",
    feedback: Feedback = "linspace",
    seed: int = 0,
    options: dict | None = None,
    **example_kwargs: Any,
) -> Report:
    """Which loops :func:`apply` would rewrite in ``model`` for these inputs, and what it
    would leave exact and why.  ``mode``, ``feedback``, ``seed`` and ``options`` (the
    mode's options, ``{"iterations": 2}`` say) as :func:`apply` takes them; the other
    keyword arguments go to the model.  Runs the model once (without gradients); the
    model itself is not changed."""
    probe = backend(mode, feedback, seed=seed, compiler="none", **(options or {}))
    compiled = _compile_method(model, "forward", probe, dynamic=False)
    with _our_errors_unwrapped(), recurrent_ops_visible(), torch.no_grad(), _GraphBreaks() as breaks, \
            _packed_calls_listed(model, probe):
        compiled(model, *example_args, **example_kwargs)
    probe.graph_breaks.extend(breaks)
    return probe.report


@contextlib.contextmanager
def _packed_calls_listed(model: nn.Module, probe: DSFBackend):
    """While the block runs, the recurrent modules of ``model`` list their packed calls'
    loops to ``probe`` (explain's backend), as an applied model's would train them."""
    modules = [(path, m) for path, m in model.named_modules() if path and isinstance(m, nn.RNNBase)
               and "forward" not in vars(m)]
    for path, module in modules:
        module.forward = PackedCalls(module, path, probe)
    try:
        yield
    finally:
        for _, module in modules:
            del module.forward
