"""Whole-sequence forward kernels: every state of a loop at once.

A loop's ``forward_kernel`` is either the name of a cell of :mod:`dsf_compile.cells`
(nn.RNN/GRU/LSTM) or the key of a registered step body, run as a rolled loop: its
input-only part hoisted and done for all T at once, then the recurrent rest stepped T
times (on CUDA compiled by Inductor and replayed as one CUDA graph; on a CPU compiled
too where registered so, writing into the buffers of all T).  A cell runs as torch's
fused op, except on CUDA, where its step body runs as such a graphed loop: faster than
cuDNN there, whose host-side cost per call idles the device; and where the backward
reuses the step's products (:func:`register_products`), which the fused op does not
keep.  Kernels are
asked for values only; the rewrites supply every mode's gradients themselves, exact
BPTT's by the adjoint loop of :func:`register_adjoint` (:func:`exact_gradients`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .cells import CARRIES, STEPS, run_cell_layer, trace_step
from .loop_ir import LoopIR
from .passes.hoist_step_inputs import HoistedBody, hoist_step_inputs
from .passes.save_products import find_products, forward_body, reusing_body

_BODIES: dict[str, HoistedBody] = {}
# exact BPTT's adjoint loops: the step body, its number of step inputs and of carries
_ADJOINTS: dict[str, tuple[torch.fx.GraphModule, int, int]] = {}
_ADJOINT_PARTS: dict[str, AdjointParts] = {}
_COMPILED_STEPS: dict[tuple, Callable] = {}
_WRITING_STEPS: dict[tuple, tuple[Callable, list[int], list[Tensor]]] = {}
# kernels whose sequential step runs compiled by Inductor on a CPU too
_COMPILED_ON_CPU: set[str] = set()
# One graph holds its loop's buffers: keep those of the few latest signatures (shapes).
GRAPH_CACHE_SIZE = 8
_GRAPHS: OrderedDict[tuple, GraphedLoop] = OrderedDict()
# The dispatcher state of ordinary eager code, read when this module is imported.
_EAGER_INCLUDE = torch._C._dispatch_tls_local_include_set()
_EAGER_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()


@contextlib.contextmanager
def eager_dispatch():
    """Run code inside a custom op's implementation as ordinary eager code, without
    autograd recording.

    An op's kernel runs with the dispatch keys above the backend excluded (autograd,
    functorch's vmap, ...); an implementation that vmaps (hoisting) or traces a VJP (the
    adjoint loops) needs them back.
    """
    with torch._C._ForceDispatchKeyGuard(_EAGER_INCLUDE, _EAGER_EXCLUDE), torch.no_grad():
        yield


def register_body(loop: LoopIR) -> str:
    """A kernel name for ``loop``'s step body.  Content-addressed: the same computation
    gets the same name in every process (graphs cached by Inductor stay valid) and in
    every layer that runs it (one compiled step and one CUDA graph serve them all),
    whatever its values are called."""
    signature = f"{graph_structure(loop.body.graph)}|{loop.num_step_inputs}|{len(loop.carry_sizes)}"
    key = "body:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(loop.body, loop.num_step_inputs, len(loop.carry_sizes))
    return key


@dataclass
class SavedProducts:
    """A loop's products with its weights, kept from the forward for the backward
    (:mod:`dsf_compile.passes.save_products`): ``kernel``, a forward kernel returning the
    loop's states and then each product at every step; ``body``, the step body reading
    them back (``count`` more per-step inputs, after its own placeholders)."""

    kernel: str
    body: torch.fx.GraphModule
    count: int


def register_products(loop: LoopIR, compile_step: bool = False) -> SavedProducts | None:
    """The kernel and the backward body that keep ``loop``'s products with its weights;
    None if its step has none.  Content-addressed like :func:`register_body`.
    ``compile_step``: the forward's sequential step runs compiled by Inductor on a CPU too
    (as it does on CUDA), which keeps it as fast as torch's fused RNN ops there."""
    counts = (loop.num_step_inputs, len(loop.carry_sizes))
    products = find_products(loop.body, *counts)
    if not products:
        return None
    signature = f"products|{graph_structure(loop.body.graph)}|{counts[0]}|{counts[1]}|{compile_step}"
    key = "products:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(forward_body(loop.body, products), *counts)
    if compile_step:
        _COMPILED_ON_CPU.add(key)
    return SavedProducts(key, reusing_body(loop.body, products), len(products))


def extra_outputs(kernel: str, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]):
    """One step's values of what kernel ``kernel`` returns beyond the states (the products
    of a :func:`register_products` kernel), computed from step 0: their shapes and dtypes,
    for the kernel's fake implementation."""
    body = _BODIES.get(kernel)
    if body is None or len(step_outputs(body.rest)) == len(carries):
        return []
    first = [x[0] for x in step_inputs]
    hoisted = first if body.pre is None else list(body.pre(*first, *invariants))
    return list(body.rest(*hoisted, *carries, *invariants))[len(carries) :]


def register_adjoint(loop: LoopIR, compile_step: bool = False) -> str:
    """A kernel name for the exact adjoint loop of ``loop`` (exact BPTT's backward), run by
    :func:`exact_gradients`.

    Its step ``t`` maps ``(x_t, s_{t-1}, g_t, e_{t+1})`` to ``e_t = J_tᵀ (g_t + e_{t+1})``,
    the gradient reaching the state step t consumed (``J_t = ∂s_t/∂s_{t-1}`` at that step's
    values; ``g`` the direct gradients of the states): run against time from
    ``e_{T+1} = 0``, ``δ_t = g_t + e_{t+1}``.  Everything in that step that does not read
    ``e`` (recomputing the gates from the saved states, their derivatives) reads only
    per-step values, so :func:`hoist_step_inputs` moves it out of the loop into a few
    batched ops over all T steps: what stays sequential is a product with the recurrent
    weights and some elementwise work per step, fewer and smaller kernels than eager
    autograd's backward walks.  Content-addressed like :func:`register_body`; the graph is
    traced for each shape it meets (:func:`adjoint_parts`).  ``compile_step``: on a CPU
    too, the sequential part runs as compiled by Inductor (as it always does on CUDA), one
    or two fused kernels and the product per step instead of a dozen small ops.
    """
    counts = (loop.num_step_inputs, len(loop.carry_sizes))
    signature = f"adjoint|{graph_structure(loop.body.graph)}|{counts[0]}|{counts[1]}|{compile_step}"
    key = "adjoint:" + hashlib.sha1(signature.encode()).hexdigest()[:16]
    _ADJOINTS.setdefault(key, (loop.body, *counts))
    if compile_step:
        _COMPILED_ON_CPU.add(key)
    return key


@dataclass
class AdjointParts:
    """Adjoint ``key`` traced for one signature: ``name``, the registered kernel of its
    sequential part (reading ``pre``'s outputs when there is a ``pre``); ``pre``, its
    gradient-free per-step part, which recomputes the step's forward on the way;
    ``state_slots``, where among ``pre``'s outputs the step's new states are (None when they
    are not all there: the forward is then recomputed on its own)."""

    name: str
    pre: torch.fx.GraphModule | None
    state_slots: list[int] | None


def adjoint_parts(key: str, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]) -> AdjointParts:
    """The parts of adjoint ``key`` for inputs like these (``step_inputs``: the loop's own,
    the states each step consumed and the direct gradients; ``carries``: the received
    gradients ``e``).  The step's VJP against its carries is traced to an aten graph that
    also returns the step's new states, then hoisted: its per-step part holds the whole
    forward of the step, so the one batched recomputation of the forward serves both the
    adjoint loop and the VJP for the loop's inputs and weights."""
    examples = [*(x[0] for x in step_inputs), *carries, *invariants]
    name = f"{key}@" + hashlib.sha1(repr(_signature(examples)).encode()).hexdigest()[:16]
    if name not in _ADJOINT_PARTS:
        from torch.fx.experimental.proxy_tensor import make_fx

        body, n_x, n_c = _ADJOINTS[key]

        def adjoint_step(*args: Tensor) -> tuple[Tensor, ...]:
            xs, previous, ws = args[:n_x], args[n_x : n_x + n_c], args[n_x + 3 * n_c :]
            direct, received = args[n_x + n_c : n_x + 2 * n_c], args[n_x + 2 * n_c : n_x + 3 * n_c]
            states, pullback = torch.func.vjp(lambda *carried: tuple(body(*xs, *carried, *ws)), *previous)
            return (*pullback(tuple(g + e for g, e in zip(direct, received))), *states)

        with eager_dispatch():
            graph = make_fx(adjoint_step)(*(t.detach() for t in examples))
        hoisted = hoist_step_inputs(graph, len(step_inputs), len(carries))
        sequential = copy.deepcopy(hoisted.rest.graph)
        output = next(n for n in sequential.nodes if n.op == "output")
        values = list(output.args[0])
        output.args = (tuple(values[: len(carries)]),)
        sequential.eliminate_dead_code()
        _BODIES[name] = HoistedBody(None, torch.fx.GraphModule(hoisted.rest, sequential))
        # the new states, if the per-step part computes them all: placeholders of the rest
        per_step = [n for n in sequential.nodes if n.op == "placeholder"][: -len(carries) - len(invariants)]
        states = values[len(carries) :]
        shared = hoisted.pre is not None and all(s in per_step for s in states)
        slots = [per_step.index(s) for s in states] if shared else None
        _ADJOINT_PARTS[name] = AdjointParts(name, hoisted.pre, slots)
        if key in _COMPILED_ON_CPU:
            _COMPILED_ON_CPU.add(name)
    return _ADJOINT_PARTS[name]


def exact_gradients(
    key: str, reverse: bool, step_inputs: list[Tensor], previous: list[Tensor], direct: list[Tensor],
    init: list[Tensor], invariants: list[Tensor],
) -> list[Tensor]:
    """Exact BPTT's gradients of a loop (run forwards unless ``reverse``) with adjoint
    ``key``: those of its initial carries, then of its floating-point step inputs and
    invariants, from the direct gradients ``direct`` of its states ``(T, B, size)``
    (``previous``: the state each step consumed).

    One batched recomputation of the step's forward over all T steps (the per-step part of
    :func:`adjoint_parts`) gives the adjoint loop its inputs and is the linearisation of
    the VJP against the loop's inputs and weights; the adjoint loop, run against time,
    gives ``δ = g + e``, which that VJP then takes in one batched pass (one GEMM per
    weight over T·B rows)."""
    with eager_dispatch():
        loop_inputs = [*step_inputs, *previous, *direct]
        zeros = [torch.zeros_like(c) for c in init]  # e after the last step
        parts = adjoint_parts(key, loop_inputs, zeros, invariants)
        x_slots, w_slots = differentiable(step_inputs), differentiable(invariants)
        n_x = len(step_inputs)
        in_dims = (0,) * len(loop_inputs) + (None,) * len(invariants)

        def forward(xs: tuple[Tensor, ...], ws: tuple[Tensor, ...]):
            xs_all, ws_all = filled(step_inputs, x_slots, xs), filled(invariants, w_slots, ws)
            if parts.pre is None:
                hoisted = tuple(loop_inputs)
            else:
                hoisted = tuple(torch.func.vmap(parts.pre, in_dims=in_dims)(*xs_all, *previous, *direct, *ws_all))
            if parts.state_slots is not None:
                states = tuple(hoisted[i] for i in parts.state_slots)
            else:
                body_dims = (0,) * (n_x + len(previous)) + (None,) * len(ws_all)
                states = tuple(torch.func.vmap(_ADJOINTS[key][0], in_dims=body_dims)(*xs_all, *previous, *ws_all))
            return states, tuple(h.detach() for h in hoisted)

        primals = (tuple(step_inputs[i] for i in x_slots), tuple(invariants[i] for i in w_slots))
        _, pullback, hoisted = torch.func.vjp(forward, *primals, has_aux=True)
        received = run_kernel(parts.name, not reverse, list(hoisted), zeros, invariants)
        deltas = [g + to_receiver(e, reverse) for g, e in zip(direct, received)]
        x_grads, w_grads = pullback(tuple(deltas))
        first = -1 if reverse else 0  # the step that consumed the initial carries
        return [*(e[first] for e in received), *x_grads, *w_grads]


def to_receiver(per_step: Tensor, reverse: bool) -> Tensor:
    """Values computed at step t moved to the step whose δ they feed: t − 1 (t + 1 for a
    reverse-time loop), with zeros where no step does."""
    zero = torch.zeros_like(per_step[:1])
    return torch.cat([zero, per_step[:-1]]) if reverse else torch.cat([per_step[1:], zero])


def differentiable(tensors) -> list[int]:
    """Positions of the tensors that can have a gradient (floating point or complex)."""
    return [i for i, t in enumerate(tensors) if t.is_floating_point() or t.is_complex()]


def filled(values, slots: list[int], replacements) -> list:
    """``values`` with ``replacements`` put at ``slots``."""
    values = list(values)
    for i, value in zip(slots, replacements):
        values[i] = value
    return values


def graph_structure(graph: torch.fx.Graph) -> str:
    """``graph``'s operations and how they connect, without the names of its values."""
    index: dict[torch.fx.Node, int] = {}
    lines = []
    for node in graph.nodes:
        index[node] = len(index)
        if node.op == "placeholder":
            target = ""
        elif isinstance(node.target, str):
            target = node.target
        else:
            target = torch.fx.node._get_qualified_name(node.target)
        operands = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        lines.append(f"{node.op} {target} {operands}")
    return "\n".join(lines)


def cell_body(kind: str, has_biases: bool) -> str:
    """The kernel name of the step body of torch's ``kind`` cell (nn.RNN/GRU/LSTM)."""
    key = f"cell:{kind}:{'bias' if has_biases else 'no-bias'}"
    if key not in _BODIES:
        _BODIES[key] = hoist_step_inputs(trace_step(kind, has_biases), 1, len(CARRIES[kind]))
    return key


def _run_body(
    key: str, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor], reverse: bool
) -> list[Tensor]:
    """Every state of a registered body.  On CUDA one CUDA graph replay of the whole loop
    over the Inductor-compiled step; on a CPU a loop of the step, compiled by Inductor
    for the bodies registered so (:func:`written_states`), else run op by op."""
    if x_steps[0].is_cuda:
        return graphed_loop(key, x_steps, carries, invariants, reverse)
    if key in _COMPILED_ON_CPU:
        return written_states(key, x_steps, carries, invariants, reverse)
    body = _BODIES[key]
    return stepped_states(body, body.rest, x_steps, carries, invariants, reverse)


def written_states(
    key: str, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor], reverse: bool
) -> list[Tensor]:
    """Every output of body ``key`` at every step, on a CPU: the input-only part done for
    all T at once, then T calls of the recurrent part compiled by Inductor to write each
    step's outputs straight into slices of ``(T, ...)`` buffers, instead of stacking T
    separate results afterwards, one more pass over memory.  A GRU layer at T=256, B=16,
    H=256 with its products kept: 49–54 ms stacked, 48–49 ms written in place (torch.gru,
    which keeps none of them: 43–45 ms; medians of 30 calls in turns, two runs)."""
    body = _BODIES[key]
    x_steps = hoisted_inputs(body, x_steps, invariants)
    carries = [c.contiguous() for c in carries]  # later steps read slices of contiguous buffers
    length, n_c = x_steps[0].shape[0], len(carries)
    passed = passed_through(body.rest, len(x_steps))
    step, read, likes = writing_step(key, [*(x[0] for x in x_steps), *carries, *invariants], passed, len(x_steps))
    outputs = [x_steps[passed[i]] if i in passed else like.new_empty((length, *like.shape))
               for i, like in enumerate(likes)]
    # every step's slices made at once: a Python-level index per slice would cost more
    x_slices = [x_steps[i].unbind(0) for i in read]
    written = [o.unbind(0) for i, o in enumerate(outputs) if i not in passed]
    carried = [o.unbind(0) for o in outputs[:n_c]]
    for t in range(length - 1, -1, -1) if reverse else range(length):
        step(*(x[t] for x in x_slices), *carries, *invariants, *(o[t] for o in written))
        carries = [c[t] for c in carried]
    return outputs


def writing_step(
    key: str, example_inputs: list[Tensor], passed: dict[int, int], num_hoisted: int
) -> tuple[Callable, list[int], list[Tensor]]:
    """The recurrent part of body ``key``, compiled by Inductor for inputs like
    ``example_inputs`` (``num_hoisted`` per-step inputs first) to write its outputs (but
    the ``passed`` ones, its inputs as they are) into tensors given after its inputs.
    With it: which of its per-step inputs it reads (a value computed before the loop only
    to be kept is not passed in at every step), and one step's outputs, whose shapes and
    dtypes the buffers take.  Cached per signature, so the compiled code's checks of its
    inputs' sizes and strides are left out: every step passes slices alike."""
    signature = (key, _signature(example_inputs))
    if signature not in _WRITING_STEPS:
        import torch._inductor.config
        from torch._inductor.compile_fx import compile_fx

        rest = _BODIES[key].rest
        with eager_dispatch():
            likes = list(rest(*example_inputs))
        graph = copy.deepcopy(rest.graph)
        output = next(n for n in graph.nodes if n.op == "output")
        values = [v for i, v in enumerate(output.args[0]) if i not in passed]
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            buffers = [graph.placeholder(f"written_{i}") for i in range(len(values))]
        with graph.inserting_before(output):
            for buffer, value in zip(buffers, values):
                graph.call_method("copy_", (buffer, value))
        output.args = ((),)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        read = [i for i in range(num_hoisted) if placeholders[i].users]
        for i in range(num_hoisted):
            if i not in read:
                graph.erase_node(placeholders[i])
        inputs = [example_inputs[i] for i in read] + example_inputs[num_hoisted:]
        written = [like.new_empty(like.shape) for i, like in enumerate(likes) if i not in passed]
        with eager_dispatch(), torch._inductor.config.patch(size_asserts=False):
            compiled = compile_fx(torch.fx.GraphModule(rest, graph), [*inputs, *written])
        _WRITING_STEPS[signature] = compiled, read, likes
    return _WRITING_STEPS[signature]


def stepped_states(
    body: HoistedBody, step: Callable, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor],
    reverse: bool = False,
) -> list[Tensor]:
    """A plain loop of ``step`` (the recurrent part of ``body``) over time (from the last
    step to the first if ``reverse``: read in place, as flipped copies of every input would
    cost a pass over memory each), the input-only part of the step done for all T at once
    before it."""
    x_steps = hoisted_inputs(body, x_steps, invariants)
    length, n_c = x_steps[0].shape[0], len(carries)
    passed = passed_through(body.rest, len(x_steps))
    outputs: list[list[Tensor]] = [[] for _ in step_outputs(body.rest)]
    for t in range(length - 1, -1, -1) if reverse else range(length):
        values = step(*(x[t] for x in x_steps), *carries, *invariants)
        carries = list(values[:n_c])
        for i, (seq, value) in enumerate(zip(outputs, values)):
            if i not in passed:
                seq.append(value)
    return [x_steps[passed[i]] if i in passed else torch.stack(seq[::-1] if reverse else seq)
            for i, seq in enumerate(outputs)]


def passed_through(rest: torch.fx.GraphModule, num_hoisted: int) -> dict[int, int]:
    """Outputs of a step that are its per-step inputs as they are (a product kept for the
    backward but computed before the loop), by position: the input, not T slices stacked
    again."""
    placeholders = [n for n in rest.graph.nodes if n.op == "placeholder"][:num_hoisted]
    return {i: placeholders.index(v) for i, v in enumerate(step_outputs(rest)) if v in placeholders}


def step_outputs(rest: torch.fx.GraphModule) -> tuple:
    """The values a step graph returns (its new carries first)."""
    return next(n for n in rest.graph.nodes if n.op == "output").args[0]


def compiled_step(key: str, example_inputs: list[Tensor]) -> Callable:
    """The recurrent part of body ``key`` compiled by Inductor for inputs like
    ``example_inputs`` (static shapes, values only), cached per signature."""
    signature = (key, _signature(example_inputs))
    if signature not in _COMPILED_STEPS:
        from torch._inductor.compile_fx import compile_fx

        rest = _BODIES[key].rest
        graph = torch.fx.GraphModule(rest, copy.deepcopy(rest.graph))
        with eager_dispatch():
            _COMPILED_STEPS[signature] = compile_fx(graph, list(example_inputs))
    return _COMPILED_STEPS[signature]


def step_inputs_of(body: HoistedBody, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor]):
    """Example inputs of ``body.rest`` for one step of this loop."""
    first = hoisted_inputs(body, [x[:1] for x in x_steps], invariants)
    return [*(x[0] for x in first), *carries, *invariants]


def hoisted_inputs(body: HoistedBody, x_steps: list[Tensor], invariants: list[Tensor]) -> list[Tensor]:
    """The per-step inputs of ``body.rest``: ``body.pre`` applied to every step at once."""
    if body.pre is None:
        return x_steps
    in_dims = (0,) * len(x_steps) + (None,) * len(invariants)
    with eager_dispatch():
        return list(torch.func.vmap(body.pre, in_dims=in_dims)(*x_steps, *invariants))


class GraphedLoop:
    """A whole rolled forward as one CUDA graph: the hoisted input-only work, then T steps
    of the compiled recurrent part, replayed with no host work per step.  Inputs are
    copied into the graph's static buffers and the states copied out, so one graph serves
    every layer with the same signature."""

    def __init__(
        self, body: HoistedBody, step: Callable, inputs: list[Tensor], counts: tuple[int, int], reverse: bool
    ) -> None:
        self.static = [t.clone(memory_format=torch.contiguous_format) for t in inputs]
        self.counts, self.reverse = counts, reverse
        run = lambda: self._states(body, step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # outside the capture: cuBLAS handles and workspaces, allocator warm-up
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run()

    def _states(self, body: HoistedBody, step: Callable) -> list[Tensor]:
        n_x, n_c = self.counts
        x_steps, carries, invariants = self.static[:n_x], self.static[n_x : n_x + n_c], self.static[n_x + n_c :]
        return stepped_states(body, step, x_steps, carries, invariants, self.reverse)

    def __call__(self, inputs: list[Tensor]) -> list[Tensor]:
        for buffer, value in zip(self.static, inputs):
            buffer.copy_(value)
        self.graph.replay()
        return [o.clone() for o in self.outputs]


def graphed_loop(
    key: str, x_steps: list[Tensor], carries: list[Tensor], invariants: list[Tensor], reverse: bool
) -> list[Tensor]:
    """Every state of body ``key`` on CUDA through a cached :class:`GraphedLoop` (or, while
    an enclosing CUDA graph is being captured, the same loop captured into that one)."""
    body = _BODIES[key]
    inputs = [*x_steps, *carries, *invariants]
    # the graph reads contiguous copies of the inputs, so their strides do not matter
    signature = (key, reverse, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
    if signature in _GRAPHS:
        _GRAPHS.move_to_end(signature)
        return _GRAPHS[signature](inputs)
    if torch.cuda.is_current_stream_capturing():
        step = compiled_step(key, step_inputs_of(body, x_steps, carries, invariants))
        return stepped_states(body, step, x_steps, carries, invariants, reverse)
    contiguous = [t.contiguous() for t in inputs]
    n_x, n_c = len(x_steps), len(carries)
    groups = contiguous[:n_x], contiguous[n_x : n_x + n_c], contiguous[n_x + n_c :]
    step = compiled_step(key, step_inputs_of(body, *groups))
    _GRAPHS[signature] = GraphedLoop(body, step, contiguous, (n_x, n_c), reverse)
    while len(_GRAPHS) > GRAPH_CACHE_SIZE:
        _GRAPHS.popitem(last=False)
    return _GRAPHS[signature](inputs)


def clear_graphs() -> None:
    """Drop every cached CUDA graph (and the memory its buffers hold)."""
    _GRAPHS.clear()


def _signature(tensors: list[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def run_kernel(
    kernel: str, reverse: bool, step_inputs: list[Tensor], carries: list[Tensor], invariants: list[Tensor]
) -> list[Tensor]:
    """Every state ``(T, B, size)`` of a loop; ``reverse`` runs from t = T to 1."""
    if kernel in STEPS:
        (x,) = step_inputs
        if x.is_cuda:
            # The cell's step compiled and replayed as one CUDA graph.  cuDNN's
            # RNN call costs about 10 ms of host time on an H100 machine (torch 2.11), more
            # than its device time, so the device sat idle; the graph has no host work per
            # step (experiments/results/bench-*.md).
            return graphed_loop(cell_body(kernel, len(invariants) == 4), [x], carries, invariants, reverse)
        states = run_cell_layer(kernel, x.flip(0) if reverse else x, carries, invariants)
        return [s.flip(0) for s in states] if reverse else states
    if kernel in _BODIES:
        return _run_body(kernel, step_inputs, carries, invariants, reverse)
    raise KeyError(f"unknown loop kernel {kernel!r} (a step body must be registered in this process)")
