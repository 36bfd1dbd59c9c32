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
    # truncated BPTT: the highway colour of the same cost, lighter
    "tbptt-w1": "#c5b0d5",
    "tbptt-w2": "#c49c94",
    "tbptt-w4": "#9edae5",
    "auto": "#e6550d",
}
_SPARE = ["#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78"]


def colour(method: str) -> str:
    """The method's colour; a method without one gets a fixed spare by its name."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)]


def smoothed(values: list[float], share: float = 0.05) -> list[float]:
    """A centred moving average over about ``share`` of the points on each side, the window
    narrowing symmetrically at the ends: it does not lag (a straight line stays itself, and
    the last point is the last logged value), unlike an exponential average."""
    half = int(len(values) * share)
    out = []
    for i in range(len(values)):
        k = min(half, i, len(values) - 1 - i)
        window = values[i - k : i + k + 1]
        out.append(sum(window) / len(window))
    return out


def draw_order(runs: list[dict]) -> list[tuple[int, dict]]:
    """(z-order, run) with the exact-BPTT runs drawn last, on top of every other line."""
    exact = ("eager-bptt", "bptt")
    ordered = [r for r in runs if r["method"] not in exact] + [r for r in runs if r["method"] in exact]
    return [(2 + i, run) for i, run in enumerate(ordered)]


def plain_log_axis(ax) -> None:
    """A perplexity axis with plain tick labels (40, 50, 60, not 4×10¹): logarithmic where
    the values span more than a factor of 4, else linear."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # the data's range, not the view's: a linear view's margin may reach below zero
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if low > 0 and high / low > 4:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plain_token_axis(ax) -> None:
    """A token-count x axis labelled 500k, 1M, 2.5M, not with a ×10⁶ offset."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _) -> str:
        for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:g}{suffix}"
        return f"{value:g}"

    ax.xaxis.set_major_formatter(FuncFormatter(label))
