"""Small tensor helpers every kernel shares: eager dispatch inside a custom op, moving
per-step values to the step they feed, picking and filling the differentiable slots."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

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


def to_receiver(per_step: Tensor, reverse: bool) -> Tensor:
    """Values computed at step t moved to the step whose δ they feed: t − 1 (t + 1 for a
    reverse-time loop), with zeros where no step does."""
    zero = torch.zeros_like(per_step[:1])
    return torch.cat([zero, per_step[:-1]]) if reverse else torch.cat([per_step[1:], zero])


def rademacher_like(like: Tensor) -> Tensor:
    """A tensor of independent ±1 draws shaped like ``like``, in its dtype and on its device."""
    return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1


def differentiable(tensors) -> list[int]:
    """Positions of the tensors that can have a gradient (floating point or complex)."""
    return [i for i, t in enumerate(tensors) if t.is_floating_point() or t.is_complex()]


def filled(values, slots: list[int], replacements) -> list:
    """``values`` with ``replacements`` put at ``slots``."""
    values = list(values)
    for i, value in zip(slots, replacements):
        values[i] = value
    return values


def signature(tensors: list[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
