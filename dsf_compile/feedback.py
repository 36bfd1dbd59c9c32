"""The diagonal feedback λ of each loop: resolving the user's ``feedback`` option."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .loop_ir import LoopIR

Feedback = str | float | Tensor | Callable[[LoopIR], Tensor | float | Sequence[float]]


_CHOICES = "'linspace', 'uniform', 'adaptive', a float, a 1-D tensor or a callable"


class FeedbackError(ValueError):
    """λ given for a loop does not fit it."""


def check_feedback_option(feedback: Feedback) -> None:
    """Reject an unusable ``feedback`` argument before anything is compiled."""
    if isinstance(feedback, str):
        if feedback not in ("linspace", "uniform", "adaptive"):
            raise ValueError(f"feedback={feedback!r}: expected {_CHOICES}")
    elif isinstance(feedback, bool):
        raise TypeError(f"feedback must be {_CHOICES}, not a bool")
    elif isinstance(feedback, (int, float)):
        _check_range(torch.tensor([float(feedback)]), "feedback")
    elif isinstance(feedback, Tensor):
        if feedback.dim() != 1:
            raise FeedbackError(
                f"feedback tensor must be 1-D (one λ per state unit), got shape {tuple(feedback.shape)}"
            )
        _check_range(feedback, "feedback tensor")
    elif not callable(feedback):
        raise TypeError(f"feedback must be {_CHOICES}, not {type(feedback).__name__}")


def _check_range(lam: Tensor, what: str) -> None:
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or bool((lam > 1).any()):
        raise FeedbackError(
            f"{what}: λ must lie in [0, 1] (a feedback above 1 makes the backward recurrence grow "
            f"without bound); got min {lam.min().item():.4g}, max {lam.max().item():.4g}"
        )


def resolve_feedback(feedback: Feedback, loop: LoopIR, seed: int) -> Tensor:
    """λ for ``loop``: a float64 CPU tensor of shape ``(loop.state_size,)`` in [0, 1].

    ``seed`` seeds the draw of ``"uniform"``; callers make it differ between loops.
    ``"adaptive"`` has no λ before training: the backward estimates it.
    """
    if isinstance(feedback, str) and feedback == "adaptive":
        raise ValueError("feedback='adaptive' is estimated in the backward, not resolved beforehand")
    size = loop.state_size
    if isinstance(feedback, str) and feedback == "linspace":
        lam = torch.linspace(0, 1, size, dtype=torch.float64)
    elif isinstance(feedback, str):
        generator = torch.Generator().manual_seed(seed)
        lam = torch.rand(size, generator=generator, dtype=torch.float64)
    elif isinstance(feedback, (int, float)):
        lam = torch.full((size,), float(feedback), dtype=torch.float64)
    elif isinstance(feedback, Tensor):
        lam = feedback
    else:
        try:
            lam = feedback(loop)
        except Exception as error:
            # raised inside the compiler, it would reach the user wrapped as a backend crash
            raise FeedbackError(
                f"the feedback callable raised for loop {loop.name} ({loop.source}): {type(error).__name__}: {error}"
            ) from error
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            lam = torch.full((size,), float(lam), dtype=torch.float64)
        elif not isinstance(lam, (Tensor, Sequence)):
            raise FeedbackError(
                f"the feedback callable returned {type(lam).__name__} for loop {loop.name} ({loop.source}); "
                f"expected a float or {size} values (a tensor or a sequence)"
            )
    lam = torch.as_tensor(lam).detach().to("cpu", torch.float64)
    if lam.shape != (size,):
        carries = " + ".join(f"{n}:{s}" for n, s in zip(loop.carry_names, loop.carry_sizes))
        raise FeedbackError(
            f"λ for loop {loop.name} ({loop.source}) has shape {tuple(lam.shape)}, expected ({size},): "
            f"one value per unit of its state ({carries}). Pass a callable feedback to give loops "
            f"of different sizes their own λ."
        )
    _check_range(lam, f"λ for loop {loop.name}")
    return lam


def summarize(lam: Tensor | None) -> str:
    """A short human description of λ for reports."""
    if lam is None:
        return "-"
    lam = lam.double().cpu()
    if lam.numel() == 1 or bool((lam == lam[0]).all()):
        return f"const {lam[0].item():.3g}"
    ref = torch.linspace(0, 1, lam.numel(), dtype=lam.dtype)
    if torch.allclose(lam, ref):
        return f"linspace(0, 1, {lam.numel()})"
    return f"min {lam.min().item():.3g} mean {lam.mean().item():.3g} max {lam.max().item():.3g}"


class AdaptiveEstimates(dict):
    """The latest adaptive λ of each loop of one backend (loop name -> λ), kept between
    backward passes for smoothing and read by its report."""


# backend key -> its estimates; the backend holds them, so they go with it
_ESTIMATES: weakref.WeakValueDictionary[str, AdaptiveEstimates] = weakref.WeakValueDictionary()


def register_estimates(key: str) -> AdaptiveEstimates:
    """The estimates kept under ``key`` (made the first time)."""
    estimates = _ESTIMATES.get(key)
    if estimates is None:
        estimates = _ESTIMATES[key] = AdaptiveEstimates()
    return estimates


@torch.library.custom_op("dsf::smoothed_feedback", mutates_args=())
def smoothed_feedback(estimate: Tensor, key: str, momentum: float) -> Tensor:
    """``momentum · λ_previous + (1 − momentum) · estimate`` for the loop ``key`` names
    (``"<backend>/<loop>"``), the estimate alone at its first backward; remembers the
    result.  Opaque, so that the compiled backward calls it at every step."""
    owner, _, loop = key.partition("/")
    estimates = _ESTIMATES.get(owner)
    previous = None if estimates is None else estimates.get(loop)
    if previous is not None and previous.shape == estimate.shape:
        lam = momentum * previous.to(estimate) + (1 - momentum) * estimate
    else:
        lam = estimate.clone()
    if estimates is not None:
        estimates[loop] = lam.detach().clone()
    return lam


@smoothed_feedback.register_fake
def _(estimate: Tensor, key: str, momentum: float) -> Tensor:
    return torch.empty_like(estimate)
