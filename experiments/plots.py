"""What every figure of the experiments shares: one colour per method, whatever the figure."""

from __future__ import annotations

METHOD_COLOURS = {
    "bptt": "#000000",
    "eager-bptt": "#000000",
    "ft": "#1f77b4",
    "dsf": "#d62728",
    "dsf-linspace": "#d62728",
    "dsf-uniform": "#e377c2",
    "dsf-adaptive": "#2ca02c",
    "highway-k0": "#ff7f0e",
    "highway-k1": "#9467bd",
    "highway-k2": "#8c564b",
    "highway-k4": "#17becf",
}
_SPARE = ["#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78"]


def colour(method: str) -> str:
    """The method's colour; a method without one gets a fixed spare by its name."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)]


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard draws curves)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out
