"""The names the experiments give training methods, and what each asks of ``dsf_compile.apply``.

``eager-bptt`` (the model as written, eager PyTorch: torch's fused RNN op, cuDNN on a GPU;
no ``apply``), ``bptt`` (exact BPTT through ``apply``), ``ft``, ``dsf`` (λ = linspace),
``dsf-<feedback>`` (``dsf-uniform``, ``dsf-adaptive``; ``dsf-linspace`` is ``dsf``) and
``highway-k<k>``: the labels ``train.py`` writes in its summaries, the sweep files use, and
the figures colour.
"""

from __future__ import annotations

import re

FEEDBACKS = ("linspace", "uniform", "adaptive")
EAGER_BPTT = "eager-bptt"
# the methods whose gradients are exact BPTT's: either is the reference of a comparison
EXACT = (EAGER_BPTT, "bptt")


def apply_options(label: str) -> dict | None:
    """The ``dsf_compile.apply`` keyword arguments of a method label; None for
    ``eager-bptt``, which trains the model as written."""
    if label == EAGER_BPTT:
        return None
    if label in ("bptt", "ft", "dsf"):
        return {"mode": label}
    if label.startswith("dsf-") and label.removeprefix("dsf-") in FEEDBACKS:
        return {"mode": "dsf", "feedback": label.removeprefix("dsf-")}
    highway = re.fullmatch(r"highway-k(\d+)", label)
    if highway:
        return {"mode": "highway", "iterations": int(highway.group(1))}
    raise ValueError(f"method {label!r}: expected eager-bptt, bptt, ft, dsf, dsf-<{'|'.join(FEEDBACKS)}> "
                     "or highway-k<k>")


def label_of(mode: str, feedback: str = "linspace", iterations: int | None = None) -> str:
    """The label of a method given as ``apply`` options (the inverse of :func:`apply_options`)."""
    if mode == EAGER_BPTT:
        return EAGER_BPTT
    if mode == "highway":
        return f"highway-k{iterations}"
    if mode == "dsf" and feedback != "linspace":
        return f"dsf-{feedback}"
    return mode


def train_flags(label: str) -> list[str]:
    """``train.py``'s flags of a method label (the labels train.py writes in its summaries)."""
    options = apply_options(label)
    if options is None:  # eager-bptt: the model as written
        return ["--method", label]
    flags = ["--method", options["mode"]]
    if "feedback" in options:
        flags += ["--feedback", options["feedback"]]
    if "iterations" in options:
        flags += ["--iterations", str(options["iterations"])]
    return flags
