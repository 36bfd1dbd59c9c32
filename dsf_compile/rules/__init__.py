"""Backward rules: how each loop's backward forms its state gradients δ (DESIGN.md §9).

One table, :data:`RULES`, maps the names ``apply(model, mode=...)`` takes to the rules,
each a short file whose docstring states its maths; a :class:`Rule` object written by a
user plugs in the same way (``apply(model, mode=MyRule())``), and :func:`register_rule`
gives it a name.  The runtime knows only the protocol of :class:`Rule`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from ..feedback import Feedback, check_feedback_option
from .adaptive import Adaptive
from .auto import Auto
from .bptt import ExactBPTT
from .dsf import DSF
from .ft import FT
from .highway import Highway, NoHighwayPath
from .rule import Rule, bound_field, eager_key
from .tbptt import TruncatedBPTT

# name -> the rule it builds (a class or a function); its keyword arguments are the mode's
# options, which ``apply`` takes by name (``feedback`` and ``seed`` are dsf's).
RULES: dict[str, Callable[..., Rule]] = {
    "dsf": DSF,
    "ft": FT,
    "adaptive": Adaptive,
    "highway": Highway,
    "tbptt": TruncatedBPTT,
    "auto": Auto,
    "bptt": ExactBPTT,
}

__all__ = ["RULES", "Adaptive", "Auto", "DSF", "ExactBPTT", "FT", "Highway", "NoHighwayPath", "Rule",
           "TruncatedBPTT", "bound_field", "eager_key", "make_rule", "register_rule", "rule_options"]


def register_rule(name: str, factory: Callable[..., Rule]) -> None:
    """Make ``mode=name`` build ``factory(**options)`` (a :class:`Rule` class, say)."""
    if not callable(factory):
        raise TypeError(f"register_rule: {name!r} needs a callable that builds a Rule, got {factory!r}")
    RULES[name] = factory


def rule_options(name: str) -> list[str]:
    """The options ``mode=name`` takes (not the fields a rule fills in when it is bound to
    a loop: :func:`bound_field`)."""
    factory = RULES[name]
    bound = {f.name for f in dataclasses.fields(factory) if f.metadata.get("bound")} \
        if dataclasses.is_dataclass(factory) else set()
    parameters = inspect.signature(factory).parameters
    return [p for p in parameters if p not in bound and parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]


def make_rule(mode: str | Rule, feedback: Feedback = "linspace", seed: int = 0, **options) -> Rule:
    """The rule ``apply(model, mode, feedback, seed=..., **options)`` asks for, its options
    checked: an option the mode does not read is refused, not ignored."""
    if isinstance(mode, Rule):
        given = {**options, **({"feedback": feedback} if not _is_default(feedback) else {})}
        if given:
            raise ValueError(f"mode is a Rule object ({type(mode).__name__}), which takes its options itself; "
                             f"got {', '.join(given)} as well")
        return mode
    if not isinstance(mode, str) or mode not in RULES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(map(repr, RULES))}, or a dsf_compile.Rule")
    check_feedback_option(feedback)
    adaptive = isinstance(feedback, str) and feedback == "adaptive"
    if "momentum" in options and not adaptive:
        raise ValueError("momentum smooths feedback='adaptive' and has no effect otherwise")
    if adaptive:
        if mode != "dsf":
            raise ValueError(f"feedback='adaptive' is a λ for mode='dsf', not for mode={mode!r}")
        mode, options = "adaptive", dict(options)
    elif not _is_default(feedback) and mode != "dsf":
        if mode in ("highway", "auto"):
            raise ValueError(f"mode={mode!r} takes its diagonal from the step (K), not from feedback; "
                             "leave feedback at its default")
        raise ValueError(f"feedback is λ of mode='dsf'; mode={mode!r} does not read it")
    accepted = rule_options(mode)
    for option, value in options.items():
        if option not in accepted:
            owners = [name for name in RULES if option in rule_options(name)]
            where = " or ".join(f"mode={name!r}" for name in owners) if owners else "no mode"
            raise ValueError(f"{option}={value!r} is an option of {where}, not of mode={mode!r}")
    if mode == "dsf":
        return DSF(feedback, seed, **options)
    return RULES[mode](**options)


def _is_default(feedback: Feedback) -> bool:
    return isinstance(feedback, str) and feedback == "linspace"

