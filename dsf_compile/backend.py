"""The torch.compile backend: find loops in the Dynamo graph, rewrite them, compile."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from .feedback import Feedback
from .loop_ir import LeftExact, LoopIR
from .passes.find_nested_loops import find_nested_loops
from .passes.find_python_loops import find_python_loops
from .passes.find_rnn_ops import find_recurrent_ops
from .passes.find_scan_loops import find_scan_loops
from .passes.rewrite_python_loops import rewrite_python_loop, rewrite_scan_loop
from .passes.rewrite_rnn_ops import rewrite_recurrent_op
from .passes.verify_outputs import changed_outputs, output_metadata
from .report import LoopReport, Report
from .rules import NoHighwayPath, Rule, make_rule
from .runtime import LoopPlan, plan_for
from .traced_rnn import restore_torch_calls

COMPILERS = ("inductor", "aot_eager", "none")


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` with what Dynamo keeps on its nodes beside ``meta`` (the source
    of each input, which AOTAutograd reads)."""
    copied = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, copied.nodes):
        for attribute, value in vars(old).items():
            if not hasattr(new, attribute):
                setattr(new, attribute, value)
    return copied


class DSFError(RuntimeError):
    """Base class of the errors dsf_compile raises about a model."""


class UnsupportedLoopError(DSFError):
    """``strict=True`` and a loop (or the whole model) would not be rewritten."""


class DSFBackend:
    """A ``torch.compile`` backend that trains every loop with one backward rule
    (:mod:`dsf_compile.rules`: DSF, FT-BPTT, adaptive λ, Highway-BP, truncated BPTT, auto,
    exact BPTT, or a user's :class:`~dsf_compile.Rule`).

    ``compiler`` picks what runs the rewritten graph: ``"inductor"`` (the real thing),
    ``"aot_eager"`` (AOTAutograd without code generation: fast to build, for tests and
    debugging) or ``"none"`` (find loops only and run the Dynamo graph unchanged, as
    :func:`dsf_compile.explain` does).  After compiling, ``.report`` says what was found
    and ``.graphs`` holds the forward and backward graphs AOTAutograd produced.
    """

    def __init__(
        self,
        mode: str | Rule = "dsf",
        feedback: Feedback = "linspace",
        *,
        seed: int = 0,
        strict: bool = False,
        compiler: str = "inductor",
        **options,
    ) -> None:
        if compiler not in COMPILERS:
            raise ValueError(f"compiler={compiler!r}: expected one of {', '.join(map(repr, COMPILERS))}")
        self.rule = make_rule(mode, feedback, seed, **options)
        self.mode = mode if isinstance(mode, str) else type(mode).__name__
        self._mode_argument, self.options = mode, dict(options)
        self.feedback, self.seed, self.strict, self.compiler = feedback, seed, strict, compiler
        self._loops: dict[tuple[str, str], LoopReport] = {}
        self._plans: dict[tuple[str, str], LoopPlan] = {}
        self._noted: list[tuple[str, str]] = []  # the loops noted while the graph in hand is rewritten
        self._left: dict[tuple[str, str, str], LeftExact] = {}
        self.graphs: list[tuple[str, torch.fx.GraphModule]] = []
        self.graph_breaks: list[str] = []
        self.eager_calls: list[str] = []
        self._running = self._accounted = 0
        self._traced = False  # whether any graph or packed call has reached this backend yet

    @property
    def adaptive_estimates(self) -> dict:
        """The latest adaptive λ of each loop (loop name -> λ), when the rule estimates one."""
        return getattr(self.rule, "estimates", {})

    @property
    def is_running(self) -> bool:
        """Whether a compiled method of an applied model is being called."""
        return self._running > 0

    @property
    def is_accounted(self) -> bool:
        """Whether eager runs of recurrent modules now are already accounted for (a method
        run eagerly past Dynamo's recompile limit, gradient_fidelity's exact run)."""
        return self._accounted > 0

    @contextlib.contextmanager
    def running(self, accounted: bool = False):
        self._running += 1
        self._accounted += accounted
        try:
            yield
        finally:
            self._running -= 1
            self._accounted -= accounted

    def __deepcopy__(self, memo: dict) -> DSFBackend:
        return self  # shared by copies of a model, like the compiled function that calls it

    def __reduce__(self):
        # pickled with a model (torch.save): the options, not the graphs or the report
        return DSFBackend, (self._mode_argument, self.feedback), {
            "seed": self.seed, "strict": self.strict, "compiler": self.compiler, **self.options}

    def __setstate__(self, options: dict) -> None:
        self.__init__(self._mode_argument, self.feedback, **options)

    @property
    def report(self) -> Report:
        """What was found and rewritten so far; each loop's λ column as its rule says it now
        (an adaptive estimate, the k auto chose)."""
        loops = [dataclasses.replace(loop, feedback=self._plans[key].rule.describe_feedback(),
                                     rewrite=self._plans[key].rule.describe())
                 for key, loop in self._loops.items()]
        return Report(loops, list(self._left.values()), list(self.graph_breaks), list(self.eager_calls),
                      traced=self._traced)

    def plan_for_loop(self, loop: LoopIR) -> LoopPlan:
        """The backend's rule bound to ``loop``, with what the loop's forward keeps for it."""
        try:
            return plan_for(self.rule, loop, compile_step=self.compiler == "inductor")
        except NoHighwayPath:
            raise UnsupportedLoopError(
                f"mode={self.mode!r} needs a residual path in the step, each new carry written as "
                f"a ⊙ carry + b(...) (a GRU's update gate, an LSTM's forget gate, a padding mask): "
                f"loop {loop.name} at {loop.source} (carries {', '.join(loop.carry_names)}) has none. "
                "Train it with mode='dsf' (feedback='adaptive' estimates its Jacobian's diagonal)."
            ) from None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        self._traced = True
        restore_torch_calls(gm)
        self._left_exact(find_nested_loops(gm))
        if self.compiler == "none":
            self._rewrite(gm, {})
            return self._compile(gm, example_inputs)
        expected = output_metadata(gm)
        original = _copy_graph(gm.graph)
        excluded: dict[str, str] = {}  # loops left exact, by the name of their first node: why
        check = None
        while True:
            failed = self._rewrite(gm, excluded, check)
            if failed is None:
                if check is not None or changed_outputs(gm, expected) is None:
                    break
                # A rewrite changed what the graph returns, which must never happen: do them
                # again one at a time, each checked, and leave the one that does exact.
                check = lambda: changed_outputs(gm, expected)  # noqa: E731
            else:
                excluded[failed[0]] = failed[1]
            for key in self._noted:
                self._loops.pop(key, None)
            gm.graph = _copy_graph(original)
            gm.recompile()
        return self._compile(gm, example_inputs)

    def _rewrite(self, gm: torch.fx.GraphModule, excluded: dict[str, str],
                 check: Callable[[], str | None] | None = None) -> tuple[str, str] | None:
        """Find every loop of ``gm`` and rewrite it (with ``compiler="none"`` only find it),
        but those ``excluded`` (keyed by the name of their first node), left exact with the
        reason given.  With ``check``, after each rewrite: what it changed in the graph's
        outputs; the first rewrite that changes anything stops this pass and is returned,
        ``(key, problem)``."""
        self._noted: list[tuple[str, str]] = []
        rewrite = self.compiler != "none"
        names: dict[str, str] = {}  # key -> the loop's name, distinct within this graph
        counts: collections.Counter[str] = collections.Counter()

        def name(loop: LoopIR, key: str) -> None:
            """Two loops that would share a name (two layers' loops on one line of a ``for``
            over layers, a module called twice) are told apart: the second is ``#2``."""
            if key not in names:
                counts[loop.name] += 1
                names[key] = loop.name if counts[loop.name] == 1 else f"{loop.name} #{counts[loop.name]}"
            loop.name = names[key]

        def handle(key: str, loops: list[LoopIR], apply_rewrite) -> tuple[str, str] | None:
            if key in excluded:
                self._left_exact([LeftExact(loop.name, loop.source, f"not rewritten: the rewrite would change "
                                            f"{excluded[key]} (a bug of dsf_compile: please report it)")
                                  for loop in loops])
                return None
            plans = [self.plan_for_loop(loop) for loop in loops]
            if rewrite:
                apply_rewrite(plans)
            for loop, plan in zip(loops, plans):
                self._note(loop, plan)
            problem = check() if check is not None else None
            return None if problem is None else (key, problem)

        sites, left_exact = find_recurrent_ops(gm)
        self._left_exact(left_exact)
        for site in sites:
            for loop in site.loops:
                name(loop, f"{site.node.name}/{loop.name}")
            failed = handle(site.node.name, site.loops, lambda plans, site=site: rewrite_recurrent_op(gm, site, plans))
            if failed:
                return failed
        scans, left_exact = find_scan_loops(gm)
        self._left_exact(left_exact)
        for found in scans:
            name(found.loop, found.node.name)
            failed = handle(found.node.name, [found.loop],
                            lambda plans, found=found: rewrite_scan_loop(gm, found, plans[0]))
            if failed:
                return failed
        # A rewrite replaces nodes that later loops may read (one layer's stacked outputs
        # are the next layer's inputs): find again after each one.
        done: set[str] = set()
        while True:
            python_loops, left_exact = find_python_loops(gm)
            pending = [f for f in python_loops if f.segments[0][0].name not in done]
            for found in pending:
                name(found.loop, found.segments[0][0].name)
            if not pending:
                break
            for found in pending if not rewrite else pending[:1]:
                key = found.segments[0][0].name
                done.add(key)
                failed = handle(key, [found.loop], lambda plans, found=found: rewrite_python_loop(gm, found, plans[0]))
                if failed:
                    return failed
        self._left_exact(left_exact)
        return None

    def _left_exact(self, items) -> None:
        for item in items:
            if self.strict:
                raise UnsupportedLoopError(
                    f"{item.what} at {item.source} cannot be rewritten: {item.reason}.  It would train with "
                    "exact gradients: strict=True refuses that (strict=False allows it, and reports it)"
                )
            self._left[(item.what, item.source, item.reason)] = item

    def _note(self, loop: LoopIR, plan: LoopPlan) -> None:
        self._traced = True
        key = (loop.name, loop.source)
        self._noted.append(key)
        self._plans[key] = plan
        self._loops[key] = LoopReport(
            name=loop.name,
            origin=loop.origin,
            source=loop.source,
            length=str(loop.length),
            batch=str(loop.batch),
            state_size=loop.state_size,
            direction=loop.direction,
            carries=", ".join(f"{n}[{s}]" for n, s in zip(loop.carry_names, loop.carry_sizes)),
            feedback=plan.rule.describe_feedback(),
            rewrite=plan.rule.describe(),
            note=loop.note,
        )

    def _record(self, kind: str, gm: torch.fx.GraphModule) -> None:
        self.graphs.append((kind, gm))

    def _compile(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        if self.compiler == "none":
            return gm.forward
        # On CPU, the decomposition of an nn.LSTM left exact picks an mkldnn op that
        # cannot be trained under compile (DESIGN.md §6).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                return self._compile_with(gm, example_inputs)

    def _compile_with(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        if self.compiler == "aot_eager":
            def compiler(kind):
                def compile_graph(graph, _inputs):
                    self._record(kind, graph)
                    return make_boxed_func(graph.forward)
                return compile_graph

            return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))(
                gm, example_inputs
            )
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner_compile(graph, inputs, **kwargs):
            self._record("backward" if kwargs.get("is_backward") else "forward", graph)
            return compile_fx_inner(graph, inputs, **kwargs)

        return compile_fx(gm, example_inputs, inner_compile=inner_compile)
