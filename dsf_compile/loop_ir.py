"""The one loop representation every front end produces and every rewrite consumes.

Like JAX's ``lax.scan``, a loop is described by a step function and how values flow
through it: per-step inputs sliced along time, carried values threaded from one step to
the next, and loop invariants (weights) shared by every step.  Front ends (recurrent aten
ops today; re-rolled Python loops and torch's ``scan`` later) only have to fill this in;
the rewrites in :mod:`dsf_compile.runtime` never look at where a loop came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx


@dataclass
class LoopIR:
    """One recurrence ``carries_t = body(step_inputs_t, carries_{t-1}, invariants)``.

    ``body`` is an FX graph of a single step.  Its placeholders are, in order, the
    per-step inputs (each a ``(B, ...)`` slice of a ``(T, B, ...)`` tensor), the carried
    values (each ``(B, size)``) and the loop invariants; it returns the tuple of new
    carried values.  The states a loop exposes to the rest of the program are exactly
    its carried values at every step: per-step work that only reads a state (a head, a
    projection) is ordinary downstream code.

    ``forward_kernel`` names an eager implementation in :mod:`dsf_compile.cells` that
    computes all T states at once faster than stepping ``body`` (torch's fused ops for
    the nn.RNN/GRU/LSTM cells).  It must compute the same function as ``body``.
    """

    name: str
    body: torch.fx.GraphModule
    carry_names: tuple[str, ...]
    carry_sizes: tuple[int, ...]
    num_step_inputs: int
    num_invariants: int
    reverse: bool
    origin: str
    source: str
    length: int | torch.SymInt | None = None
    batch: int | torch.SymInt | None = None
    forward_kernel: str | None = None
    note: str = ""  # what a report should say about how the loop was read (a peeled first step)
    # Which step input marks a row's real steps (a (B, 1) bool per step) where rows of
    # different lengths share the loop, each padded after its last real step (packed
    # sequences): the step keeps the state where it is False.
    padded_after: int | None = None
    # a loop that runs backwards in time as forwards over each row reversed within its length
    rows_reversed: bool = False

    @property
    def state_size(self) -> int:
        """Size of the whole carried state, the carries concatenated in order."""
        return sum(self.carry_sizes)

    @property
    def direction(self) -> str:
        return "reverse" if self.reverse or self.rows_reversed else "forward"


@dataclass
class LeftExact:
    """Something loop-like the passes found but did not rewrite, and why."""

    what: str
    source: str
    reason: str
