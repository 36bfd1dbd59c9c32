"""The torch.compile backend: find loops in the Dynamo graph, rewrite them, compile."""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from .feedback import Feedback, check_feedback_option, resolve_feedback, summarize
from .loop_ir import LeftExact, LoopIR
from .passes.find_nested_loops import find_nested_loops
from .passes.find_python_loops import find_python_loops
from .passes.find_rnn_ops import find_recurrent_ops
from .passes.find_scan_loops import find_scan_loops
from .passes.rewrite_python_loops import rewrite_python_loop, rewrite_scan_loop
from .passes.rewrite_rnn_ops import rewrite_recurrent_op
from .report import LoopReport, Report
from .runtime import MODES

COMPILERS = ("inductor", "aot_eager", "none")


class DSFError(RuntimeError):
    """Base class of the errors dsf_compile raises about a model."""


class UnsupportedLoopError(DSFError):
    """``strict=True`` and a loop (or the whole model) would not be rewritten."""


class DSFBackend:
    """A ``torch.compile`` backend applying DSF, FT-BPTT or exact BPTT to every loop.

    ``compiler`` picks what runs the rewritten graph: ``"inductor"`` (the real thing),
    ``"aot_eager"`` (AOTAutograd without code generation: fast to build, for tests and
    debugging) or ``"none"`` (find loops only and run the Dynamo graph unchanged, as
    :func:`dsf_compile.explain` does).  After compiling, ``.report`` says what was found
    and ``.graphs`` holds the forward and backward graphs AOTAutograd produced.
    """

    def __init__(
        self,
        mode: str = "dsf",
        feedback: Feedback = "linspace",
        *,
        seed: int = 0,
        strict: bool = False,
        compiler: str = "inductor",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(map(repr, MODES))}")
        if compiler not in COMPILERS:
            raise ValueError(f"compiler={compiler!r}: expected one of {', '.join(map(repr, COMPILERS))}")
        check_feedback_option(feedback)
        self.mode, self.feedback, self.seed, self.strict, self.compiler = mode, feedback, seed, strict, compiler
        self._loops: dict[tuple[str, str], LoopReport] = {}
        self._left: dict[tuple[str, str, str], LeftExact] = {}
        self.graphs: list[tuple[str, torch.fx.GraphModule]] = []
        self.graph_breaks: list[str] = []
        self.eager_calls: list[str] = []
        self._running = 0

    @property
    def is_running(self) -> bool:
        """Whether a compiled method of an applied model is being called."""
        return self._running > 0

    @contextlib.contextmanager
    def running(self):
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    def __deepcopy__(self, memo: dict) -> DSFBackend:
        return self  # shared by copies of a model, like the compiled function that calls it

    def __reduce__(self):
        # pickled with a model (torch.save): the options, not the graphs or the report
        return DSFBackend, (self.mode, self.feedback), {"seed": self.seed, "strict": self.strict,
                                                       "compiler": self.compiler}

    def __setstate__(self, options: dict) -> None:
        self.__init__(self.mode, self.feedback, **options)

    @property
    def report(self) -> Report:
        return Report(list(self._loops.values()), list(self._left.values()), list(self.graph_breaks),
                      list(self.eager_calls))

    def lam_for(self, loop: LoopIR) -> torch.Tensor | None:
        """λ of ``loop`` under this backend's mode (None: exact)."""
        if self.mode == "bptt":
            return None
        if self.mode == "ft":
            return torch.zeros(loop.state_size, dtype=torch.float64)
        # The seed is tied to the loop's name, not to discovery order, so λ survives
        # recompilation (a new sequence length) and graph breaks unchanged.
        seed = self.seed + zlib.crc32(loop.name.encode())
        return resolve_feedback(self.feedback, loop, seed)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        self._left_exact(find_nested_loops(gm))
        sites, left_exact = find_recurrent_ops(gm)
        self._left_exact(left_exact)
        for site in sites:
            lams = [self.lam_for(loop) for loop in site.loops]
            if self.compiler != "none":
                rewrite_recurrent_op(gm, site, self.mode, lams)
            for loop, lam in zip(site.loops, lams):
                self._note(loop, lam)
        scans, left_exact = find_scan_loops(gm)
        self._left_exact(left_exact)
        for found in scans:
            lam = self.lam_for(found.loop)
            self._note(found.loop, lam)
            if self.compiler != "none":
                rewrite_scan_loop(gm, found, self.mode, lam)
        # A rewrite replaces nodes that later loops may read (one layer's stacked outputs
        # are the next layer's inputs): find again after each one.
        python_loops, left_exact = find_python_loops(gm)
        while python_loops:
            found = python_loops[0]
            lam = self.lam_for(found.loop)
            self._note(found.loop, lam)
            if self.compiler == "none":
                python_loops = python_loops[1:]
                continue
            rewrite_python_loop(gm, found, self.mode, lam)
            python_loops, left_exact = find_python_loops(gm)
        self._left_exact(left_exact)
        return self._compile(gm, example_inputs)

    def _left_exact(self, items) -> None:
        for item in items:
            if self.strict:
                raise UnsupportedLoopError(
                    f"{item.what} at {item.source} cannot be rewritten: {item.reason} "
                    "(strict=True; pass strict=False to train it with exact gradients)"
                )
            self._left[(item.what, item.source, item.reason)] = item

    def _note(self, loop: LoopIR, lam: torch.Tensor | None) -> None:
        self._loops[(loop.name, loop.source)] = LoopReport(
            name=loop.name,
            origin=loop.origin,
            source=loop.source,
            length=str(loop.length),
            batch=str(loop.batch),
            state_size=loop.state_size,
            direction=loop.direction,
            carries=", ".join(f"{n}[{s}]" for n, s in zip(loop.carry_names, loop.carry_sizes)),
            feedback=summarize(lam) if self.mode != "bptt" else "-",
            rewrite={"dsf": "dsf", "ft": "ft (λ = 0)", "bptt": "exact (bptt)"}[self.mode],
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
