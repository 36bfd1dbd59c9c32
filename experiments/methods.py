"""The names the experiments give training methods, and what each asks of ``dsf_compile.apply``.

``eager-bptt`` (the model as written, eager PyTorch: torch's fused RNN op, cuDNN on a GPU;
no ``apply``), ``bptt`` (exact BPTT through ``apply``), ``ft``, ``dsf`` (λ = linspace),
``dsf-<feedback>`` (``dsf-uniform``, ``dsf-adaptive``; ``dsf-linspace`` is ``dsf``),
``highway-k<k>``, ``tbptt-w<window>`` (truncated BPTT) and ``auto`` (``auto-<target>`` for
another target than 0.99): the labels ``train.py`` writes in its summaries, the sweep
files use, and the figures colour.
"""

from __future__ import annotations

import re

FEEDBACKS = ("linspace", "uniform", "adaptive")
AUTO_TARGET = 0.99
EAGER_BPTT = "eager-bptt"
# the train.py settings a method label stands for, beside --method
METHOD_OPTIONS = ("feedback", "iterations", "window", "target")
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
    truncated = re.fullmatch(r"tbptt-w(\d+)", label)
    if truncated:
        return {"mode": "tbptt", "window": int(truncated.group(1))}
    auto = re.fullmatch(r"auto(?:-(0\.\d+|1))?", label)
    if auto:
        return {"mode": "auto", **({"target": float(auto.group(1))} if auto.group(1) else {})}
    raise ValueError(f"method {label!r}: expected eager-bptt, bptt, ft, dsf, dsf-<{'|'.join(FEEDBACKS)}>, "
                     "highway-k<k>, tbptt-w<window> or auto[-<target>]")


def label_of(mode: str, feedback: str = "linspace", iterations: int | None = None, window: int | None = None,
             target: float = AUTO_TARGET) -> str:
    """The label of a method given as ``apply`` options (the inverse of :func:`apply_options`)."""
    if mode == EAGER_BPTT:
        return EAGER_BPTT
    if mode == "highway":
        return f"highway-k{iterations}"
    if mode == "tbptt":
        return f"tbptt-w{window}"
    if mode == "auto":
        return "auto" if target == AUTO_TARGET else f"auto-{target:g}"
    if mode == "dsf" and feedback != "linspace":
        return f"dsf-{feedback}"
    return mode


def train_flags(label: str) -> list[str]:
    """``train.py``'s flags of a method label (the labels train.py writes in its summaries)."""
    options = apply_options(label)
    if options is None:  # eager-bptt: the model as written
        return ["--method", label]
    flags = ["--method", options["mode"]]
    for option in METHOD_OPTIONS:
        if option in options:
            flags += [f"--{option}", str(options[option])]
    return flags
