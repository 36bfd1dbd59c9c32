"""Front end for packed sequences: nn.RNN/GRU/LSTM called on a ``PackedSequence``.

Dynamo cannot trace these calls: it skips ``pack_padded_sequence`` (a graph break), and
torch's packed RNN ops have sizes that depend on the lengths' values.  So an applied
model's recurrent modules take a packed call themselves (:class:`PackedCalls`): outside
Dynamo's graphs (a ``torch.compiler.disable``'d function, between the graphs of the code
around it), each (layer, direction) runs as a loop of the library's runtime, eagerly, with
the model's rule:

* the packed data is padded into ``(T, B, F)`` in the packed order (longest row first), with
  a ``(T, B, 1)`` mask of each row's real steps;
* the step is the cell with the state kept where the mask is False (``where``), so a row's
  final state is its state at its last real step, and a loop that runs backwards in time
  runs forwards over each row reversed within its own length, so that every row's padding
  comes after its last real step in the loop's order (its reverse pass starts at its own
  last element, from the initial state, as torch's does);
* the loop's :class:`LoopIR` says which input marks the real steps (``padded_after``): the
  backward moves the gradient of a padded step's state onto the row's last real step, so
  every rule computes each row's δ over its own length, the final state's gradient entering
  there, the same as the rule run on each sequence alone;
* the outputs are packed again, the final states put back in the caller's row order.

Calls without gradients (validation), or on modules whose weights do not train, run
torch's own packed op.  A module with ``proj_size`` trains exactly, and is reported so.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .cells import CARRIES, trace_masked_step
from .loop_ir import LeftExact, LoopIR
from .passes.find_rnn_ops import MODULE_OF
from .passes.provenance import where_called
from .runtime import LoopPlan, run_loop


def kind_of(module: nn.RNNBase) -> str:
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"


class PackedCalls:
    """``module.forward`` of a recurrent module of an applied model: a packed call that
    trains runs through the library's runtime (see the module's docstring); any other call
    is the module's own forward."""

    def __init__(self, module: nn.RNNBase, path: str, backend) -> None:
        self.module, self.path, self.backend = module, path, backend
        self._plans: dict[tuple, tuple[LoopIR, LoopPlan]] = {}

    def __call__(self, input, hx=None):
        if isinstance(input, PackedSequence) and self.backend.compiler == "none":
            self._list(input)  # explain(): what a training call would run
        elif isinstance(input, PackedSequence) and self._trains():
            return dsf_packed_rnn_call(self, input, hx)
        return type(self.module).forward(self.module, input, hx)

    @torch.compiler.disable
    def _list(self, packed: PackedSequence) -> None:
        problem = self.problem()
        if problem is not None:
            self.backend._left_exact([LeftExact(f"{MODULE_OF[kind_of(self.module)]} '{self.path}'", where_called(),
                                                f"packed sequence: {problem}")])
            return
        length, batch = len(packed.batch_sizes), int(packed.batch_sizes[0])
        for layer in range(self.module.num_layers):
            for direction in range(2 if self.module.bidirectional else 1):
                self.loop(layer, direction, length, batch, where_called())

    def __deepcopy__(self, memo: dict) -> PackedCalls:
        import copy

        return PackedCalls(copy.deepcopy(self.module, memo), self.path, self.backend)

    def __reduce__(self):
        return PackedCalls, (self.module, self.path, self.backend)

    def _trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters())

    def problem(self) -> str | None:
        """Why the module's packed calls train exactly, if they do."""
        if getattr(self.module, "proj_size", 0):
            return "LSTM with proj_size is not supported"
        return None

    def loop(self, layer: int, direction: int, length: int, batch: int, source: str) -> tuple[LoopIR, LoopPlan]:
        """The (layer, direction) loop and its plan, made once and kept (its λ, its name)."""
        key = (layer, direction)
        if key not in self._plans:
            module, kind = self.module, kind_of(self.module)
            what = f"{MODULE_OF[kind]} '{self.path}' (packed sequence)"
            loop = LoopIR(
                name=f"{what} layer {layer}{' reverse' if direction else ''}",
                body=trace_masked_step(kind, module.bias),
                carry_names=CARRIES[kind],
                carry_sizes=(module.hidden_size,) * len(CARRIES[kind]),
                num_step_inputs=2,
                num_invariants=4 if module.bias else 2,
                reverse=False,  # a reverse direction runs forwards over each row reversed
                origin=what,
                source=source,
                padded_after=1,
                rows_reversed=bool(direction),
                note="packed: each row's δ over its own length" + (", rows reversed within it" if direction else ""),
            )
            self._plans[key] = (loop, self.backend.plan_for_loop(loop))
        loop, plan = self._plans[key]
        loop.length, loop.batch, loop.source = length, batch, source
        self.backend._note(loop, plan)
        return loop, plan


@torch.compiler.disable
def dsf_packed_rnn_call(calls: PackedCalls, packed: PackedSequence, hx):
    """The packed call (see the module's docstring), outside Dynamo's graphs."""
    module = calls.module
    if calls.problem() is not None:
        calls._list(packed)
        return type(module).forward(module, packed, hx)
    data, batch_sizes, sorted_indices, unsorted_indices = packed
    x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes, None, None))  # (T, B, F), longest first
    T, B = x.shape[:2]
    real = (torch.arange(T)[:, None] < lengths[None, :]).to(x.device)[..., None]  # (T, B, 1)
    kind, directions = kind_of(module), 2 if module.bidirectional else 1
    carries = _initial_states(module, kind, hx, B, x, sorted_indices, directions)
    reversal = _row_reversal(lengths, T).to(x.device) if directions == 2 else None
    source = where_called()
    weights = dict(module.named_parameters())
    names = ["weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if module.bias else ())]
    finals: list[list[Tensor]] = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            loop, plan = calls.loop(layer, direction, T, B, source)
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            index = layer * directions + direction
            inputs = x if not direction else _reorder(x, reversal)
            states = run_loop(loop, plan, [inputs, real], [c[index] for c in carries],
                              [weights[n + suffix] for n in names])
            finals.append([s[-1] for s in states])  # the state at each row's last real step, held since
            outputs.append(states[0] if not direction else _reorder(states[0], reversal))
        x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if module.training and module.dropout and layer < module.num_layers - 1:
            # on the packed rows, as torch's packed op draws it
            x = x.masked_scatter(real, F.dropout(x[real[..., 0]], module.dropout, training=True))
    output = PackedSequence(x[real[..., 0]], batch_sizes, sorted_indices, unsorted_indices)
    hidden = [torch.stack([f[i] for f in finals]) for i in range(len(carries))]
    if unsorted_indices is not None:
        hidden = [h.index_select(1, unsorted_indices) for h in hidden]
    return output, (tuple(hidden) if kind == "lstm" else hidden[0])


def _initial_states(module, kind, hx, batch, x, sorted_indices, directions) -> list[Tensor]:
    """Each carry's initial states ``(layers · directions, B, H)`` in the packed row order."""
    count = len(CARRIES[kind])
    if hx is None:
        zeros = x.new_zeros(module.num_layers * directions, batch, module.hidden_size)
        return [zeros] * count
    states = list(hx) if kind == "lstm" else [hx]
    if sorted_indices is not None:
        states = [s.index_select(1, sorted_indices) for s in states]
    return states


def _row_reversal(lengths: Tensor, length: int) -> Tensor:
    """``(T, B)`` step indices reversing each row within its own length (padding stays)."""
    t = torch.arange(length)[:, None]
    return torch.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def _reorder(values: Tensor, order: Tensor) -> Tensor:
    return values.gather(0, order[..., None].expand_as(values))
