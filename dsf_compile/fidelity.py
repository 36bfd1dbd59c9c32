"""How close an approximate backward's gradients are to exact BPTT's (DESIGN.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import Tensor


@dataclass
class ParameterFidelity:
    """One parameter's gradient under the mode against its exact gradient."""

    name: str
    cosine: float
    relative_error: float


@dataclass
class Fidelity:
    """Per-parameter cosine and relative error ``|g − g_exact| / |g_exact|``, and the same
    over all parameters' gradients concatenated (``cosine``, ``relative_error``).  A
    parameter whose exact gradient is zero has cosine 1 and error 0 if its gradient is
    zero too, else cosine 0 and an infinite error."""

    mode: str
    cosine: float
    relative_error: float
    parameters: list[ParameterFidelity]

    def __str__(self) -> str:
        rows = [[p.name, f"{p.cosine:.4f}", f"{p.relative_error:.4f}"] for p in self.parameters]
        rows.append(["(all)", f"{self.cosine:.4f}", f"{self.relative_error:.4f}"])
        return f"gradient fidelity of mode {self.mode!r} to exact BPTT:\n" + tabulate(
            rows, headers=["parameter", "cosine", "relative error"])


def cosine_and_error(got: Tensor, exact: Tensor) -> tuple[float, float]:
    """Cosine and relative error of ``got`` against ``exact``, both flattened (zero cases
    as :class:`Fidelity` says)."""
    got, exact = got.double().flatten(), exact.double().flatten()
    exact_norm, got_norm = exact.norm(), got.norm()
    if exact_norm == 0:
        return (1.0, 0.0) if got_norm == 0 else (0.0, float("inf"))
    if got_norm == 0:
        return 0.0, 1.0
    cosine = (got @ exact / (got_norm * exact_norm)).item()
    return cosine, ((got - exact).norm() / exact_norm).item()


def compare_gradients(mode: str, names: list[str], got: list[Tensor | None], exact: list[Tensor | None]) -> Fidelity:
    """The :class:`Fidelity` of ``got`` against ``exact`` (None: no gradient, i.e. zero)."""
    rows, flat_got, flat_exact = [], [], []
    for name, g, e in zip(names, got, exact):
        if g is None and e is None:
            continue
        g = torch.zeros_like(e) if g is None else g
        e = torch.zeros_like(g) if e is None else e
        rows.append(ParameterFidelity(name, *cosine_and_error(g, e)))
        flat_got.append(g.detach().double().flatten().cpu())
        flat_exact.append(e.detach().double().flatten().cpu())
    if not rows:
        raise ValueError("gradient_fidelity: the loss the closure returns depends on no trainable parameter")
    cosine, error = cosine_and_error(torch.cat(flat_got), torch.cat(flat_exact))
    return Fidelity(mode, cosine, error, rows)
