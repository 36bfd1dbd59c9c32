"""The names the experiments give training methods, and what each asks of ``dsf_compile.apply``.

``bptt``, ``ft``, ``dsf`` (λ = linspace), ``dsf-<feedback>`` (``dsf-uniform``,
``dsf-adaptive``; ``dsf-linspace`` is ``dsf``) and ``highway-k<k>``: the labels
``train.py`` writes in its summaries, the sweep files use, and the figures colour.
"""

from __future__ import annotations

import re

FEEDBACKS = ("linspace", "uniform", "adaptive")


def apply_options(label: str) -> dict:
    """The ``dsf_compile.apply`` keyword arguments of a method label."""
    if label in ("bptt", "ft", "dsf"):
        return {"mode": label}
    if label.startswith("dsf-") and label.removeprefix("dsf-") in FEEDBACKS:
        return {"mode": "dsf", "feedback": label.removeprefix("dsf-")}
    highway = re.fullmatch(r"highway-k(\d+)", label)
    if highway:
        return {"mode": "highway", "iterations": int(highway.group(1))}
    raise ValueError(f"method {label!r}: expected bptt, ft, dsf, dsf-<{'|'.join(FEEDBACKS)}> or highway-k<k>")


def label_of(mode: str, feedback: str = "linspace", iterations: int | None = None) -> str:
    """The label of a method given as ``apply`` options (the inverse of :func:`apply_options`)."""
    if mode == "highway":
        return f"highway-k{iterations}"
    if mode == "dsf" and feedback != "linspace":
        return f"dsf-{feedback}"
    return mode
