"""Rolled forwards on CUDA: the whole loop captured as one CUDA graph over the
Inductor-compiled step, replayed with no host work per step."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from ..step.hoist import HoistedBody
from .cpu import compiled_step, step_inputs_of, stepped_states
from .registry import _BODIES

# One graph holds its loop's buffers: keep those of the few latest signatures (shapes).
GRAPH_CACHE_SIZE = 8


_GRAPHS: OrderedDict[tuple, GraphedLoop] = OrderedDict()


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
