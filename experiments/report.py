"""Tables and learning curves from training runs.

    python experiments/report.py --runs experiments/runs/ptb-* --name ptb
    python experiments/report.py --runs experiments/runs/wiki-* --name wiki --out experiments/results
    python experiments/report.py --from-json experiments/results/wiki-cpu.json --out /tmp/figures

Reads each run's ``summary.json`` and ``log.jsonl``; writes, into ``--out`` (default the
ignored ``experiments/runs/reports``; ``experiments/results`` only when asked):

* ``<name>.json``: every run's perplexity, settings, departures from the protocol, the
  commit and device that trained it, and its curves (so the figures can be drawn again
  from the JSON alone: ``--from-json``);
* ``<name>.md``: per model, each method's validation perplexity (the best validation of
  the run; for a run stopped before its first validation, the validation at its stop, so
  marked), the share of the FT-BPTT → BPTT gap each method closes, the paper's numbers
  where DESIGN.md has them, every departure from the protocol;
* ``<name>-curves.png``: training perplexity and validation perplexity over training
  tokens (drawn only when a run logged something to draw);
* ``<name>-fidelity.png`` for runs trained with ``--fidelity-every``: the cosine of each
  method's gradient to exact BPTT's over training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from methods import EXACT  # noqa: E402
from plots import colour, draw_order, plain_log_axis, plain_token_axis, smoothed  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "runs" / "reports"
# DESIGN.md §4: WikiText-103, GRU, transformer-like blocks, 5 epochs; keyed by
# (config, layers, width, cell, context).
PAPER = {
    ("wiki", 3, 512, "gru", 256): {"bptt": 28.32, "ft": 46.60, "dsf": 31.54},
    ("wiki", 1, 512, "gru", 256): {"bptt": 35.59, "ft": 56.61, "dsf": 37.42},
    ("wiki", 6, 512, "gru", 256): {"bptt": 25.44, "ft": 41.35, "dsf": 29.62},
    ("wiki", 12, 512, "gru", 256): {"bptt": 23.73, "ft": 36.59, "dsf": 28.99},
    ("wiki", 3, 512, "gru", 512): {"bptt": 27.14, "ft": 45.95, "dsf": 30.22},
    ("wiki", 3, 512, "gru", 1024): {"bptt": 26.75, "ft": 46.75, "dsf": 30.17},
    ("wiki", 3, 512, "gru", 2048): {"bptt": 26.52, "ft": 46.52, "dsf": 30.64},
}
# columns in this order, then any other method by name
METHOD_ORDER = ("eager-bptt", "bptt", "ft", "dsf")
CURVE_POINTS = 400  # training-curve points kept per run in the JSON


def load_run(folder: Path) -> dict:
    """A run's summary and log; raises ``ValueError`` saying why a folder holds no usable run."""
    if not (folder / "summary.json").is_file():
        why = "no summary.json (still running, or stopped before writing it: train.py --resume finishes it)"
        raise ValueError(why if folder.is_dir() else "no such folder")
    summary = json.loads((folder / "summary.json").read_text())
    log_path = folder / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    return {**summary, "folder": str(folder), "curves": curves_of(latest_attempt(log)),
            "context": summary.get("settings", {}).get("context")}


def latest_attempt(log: list[dict]) -> list[dict]:
    """A log as its run's last attempt wrote it.  train.py now rewrites its log when it
    resumes or starts over; logs written before that hold every attempt one after another,
    and a training record whose step does not pass the previous one's marks where the next
    attempt took over: what the earlier attempt logged from that step on is dropped."""
    kept: list[dict] = []
    last_train = 0
    for entry in log:
        if entry["kind"] == "train":
            if entry["step"] <= last_train:
                kept = [e for e in kept if e["step"] < entry["step"]]
            last_train = entry["step"]
        kept.append(entry)
    return kept


def curves_of(log: list[dict]) -> dict:
    """The run's curves as ``[tokens, value]`` pairs: training perplexity (thinned to
    :data:`CURVE_POINTS`), validation perplexity (each measurement, the one at a stop
    included, marked ``at_stop``), gradient fidelity."""
    train = [[e["tokens"], e["ppl"]] for e in log if e["kind"] == "train"]
    if len(train) > CURVE_POINTS:
        stride = -(-len(train) // CURVE_POINTS)
        train = train[::stride] + ([train[-1]] if (len(train) - 1) % stride else [])
    valid = [{"tokens": e["tokens"], "epoch": e["epoch"], "ppl": e["valid_ppl"], "at_stop": e["kind"] != "valid"}
             for e in log if e["kind"] in ("valid", "valid_at_stop")]
    fidelity = [[e["tokens"], e["cosine"]] for e in log if e["kind"] == "fidelity"]
    return {"train": train, "valid": valid, "fidelity": fidelity}


def perplexity(run: dict) -> tuple[float | None, str]:
    """The perplexity a table shows for ``run`` and where it comes from: its best
    validation, else (stopped before one) its validation at the stop, else None and why."""
    measured = [v["ppl"] for v in run["curves"]["valid"] if not v["at_stop"]]
    if measured:
        return min(measured), "best validation"
    at_stop = [v["ppl"] for v in run["curves"]["valid"] if v["at_stop"]]
    if at_stop:
        return at_stop[-1], f"validation at its stop (step {run['steps']}, before any epoch ended)"
    if run.get("best_valid_ppl") is not None:  # an older summary without its log
        return run["best_valid_ppl"], "best validation"
    return None, "no validation was logged (the run stopped before any)"


def reference_of(ppl: dict) -> float | None:
    """BPTT's perplexity among ``ppl``'s methods (``bptt`` through apply or ``eager-bptt``:
    the same gradients)."""
    return next((ppl[m] for m in EXACT if m in ppl), None)


def gap_closure(ppl: dict, method: str = "dsf") -> float | None:
    """(FT − method) / (FT − BPTT); None where it means nothing: a method missing, or FT not
    behind BPTT (no gap to close)."""
    bptt = reference_of(ppl)
    if bptt is None or "ft" not in ppl or method not in ppl or ppl["ft"] <= bptt:
        return None
    return (ppl["ft"] - ppl[method]) / (ppl["ft"] - bptt)


def describe_closure(ppl: dict, method: str = "dsf") -> str:
    closure = gap_closure(ppl, method)
    if closure is not None:
        return f"{100 * closure:.0f}%"
    if reference_of(ppl) is not None and "ft" in ppl and method in ppl:
        return "none: FT not behind BPTT"
    return "-"


def method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def group_key(run: dict) -> tuple:
    return (run["config"], run["layers"], run["width"], run["cell"], run.get("context"))


def describe_group(key: tuple) -> str:
    config, layers, width, cell, context = key
    return f"{config} {layers}×{width} {cell}" + (f" T={context}" if context else "")


def table(runs: list[dict]) -> tuple[str, list[str]]:
    """The markdown table (a row per model; per method the mean over its runs, with the
    range where several seeds ran) and the lines saying which runs have no perplexity."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    notes: dict[tuple, set] = defaultdict(set)
    missing = []
    for run in runs:
        key = group_key(run)
        value, source = perplexity(run)
        if value is None:
            missing.append(f"{run['folder']} ({run['method']}): {source}")
        else:
            groups[key][run["method"]].append(value)
            if source != "best validation":
                notes[key].add(f"{run['method']}: {source}")
        notes[key].add(f"{run['epochs']} epochs, {run['tokens']:,} tokens, data {run['data']}, "
                       f"device {run.get('provenance', {}).get('device', run['device'])}")
        for name, setting in run["deviations"].items():
            notes[key].add(f"{name}={setting}")
        if not run["complete"]:
            notes[key].add(f"{run['method']} incomplete ({run.get('stopped_by') or 'stopped'})")
    methods = sorted({m for g in groups.values() for m in g}, key=method_key)
    rows = []
    for key, values in groups.items():
        means = {m: statistics.fmean(v) for m, v in values.items()}
        paper = PAPER.get(key, {})
        cells = []
        for m in methods:
            if m not in values:
                cells.append("-")
                continue
            text = f"{means[m]:.2f}"
            if len(values[m]) > 1:
                text += f" ({min(values[m]):.2f}–{max(values[m]):.2f}, {len(values[m])} seeds)"
            closure = gap_closure(means, m) if m not in (*EXACT, "ft") else None
            if closure is not None:
                text += f", {100 * closure:.0f}%"
            cells.append(text)
        paper_text = "-"
        if paper:
            paper_text = " / ".join(f"{paper[m]:.2f}" for m in ("bptt", "ft", "dsf"))
            paper_text += f", DSF {100 * gap_closure(paper):.0f}%"
        rows.append([describe_group(key), *cells, paper_text, "; ".join(sorted(notes[key]))])
    headers = ["model", *methods, "paper BPTT / FT / DSF", "runs"]
    # keep "221.00" as written
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), missing


def plot(runs: list[dict], path: Path) -> bool:
    """Training perplexity (smoothed without lag) and validation perplexity over training
    tokens, a fixed colour per method, a line style per model, the paper's numbers as thin
    dashed lines; exact BPTT drawn last and dashed, so no other line hides it.  Nothing is
    drawn (False) when no run logged a point."""
    if not any(run["curves"]["train"] or run["curves"]["valid"] for run in runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = sorted({model_of(run) for run in runs})
    styles = dict(zip(models, ["-", "--", ":", "-."] * len(models)))
    labelled = set()
    for z, run in draw_order(runs):
        label = f"{run['method']}" + (f" ({model_of(run)})" if len(models) > 1 else "")
        if label in labelled:
            label = "_" + label  # matplotlib leaves it out of the legend: seeds share one entry
        labelled.add(label)
        exact = run["method"] in EXACT
        style = dict(color=colour(run["method"]), zorder=z, linewidth=2.2 if exact else 1.4,
                     linestyle=(0, (5, 2)) if exact else styles[model_of(run)])
        train = run["curves"]["train"]
        if train:
            train_ax.plot([t for t, _ in train], smoothed([p for _, p in train]), label=label, **style)
        valid = run["curves"]["valid"]
        if valid:
            valid_ax.plot([v["tokens"] for v in valid], [v["ppl"] for v in valid], marker="o", markersize=3.5,
                          label=label, **style)
    for key in {group_key(r) for r in runs}:
        for method, value in PAPER.get(key, {}).items():
            valid_ax.axhline(value, color=colour(method), linestyle=(0, (1, 3)), linewidth=0.9,
                             label=f"paper {method} {value}")
    train_ax.set(xlabel="training tokens", ylabel="train perplexity (smoothed)", title="training")
    valid_ax.set(xlabel="training tokens", ylabel="validation perplexity", title="validation")
    for ax in (train_ax, valid_ax):
        plain_log_axis(ax)
        plain_token_axis(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(", ".join(models), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def model_of(run: dict) -> str:
    """The model and data a run trained, as a figure names them."""
    context = f", T={run['context']}" if run.get("context") else ""
    return (f"{run['layers']}×{run['width']} {run['cell'].upper()} on {run['data']}{context} "
            f"({run['config']} protocol)")


def plot_fidelity(runs: list[dict], path: Path) -> bool:
    """Cosine to exact BPTT over training, one line per run that logged it."""
    logged = [run for run in runs if run["curves"]["fidelity"]]
    if not logged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in logged:
        points = run["curves"]["fidelity"]
        ax.plot([t for t, _ in points], [c for _, c in points], marker=".", color=colour(run["method"]),
                label=f"{run['method']} ({model_of(run)})")
    ax.set(xlabel="training tokens", ylabel="cosine to exact BPTT (all parameters)", ylim=(-0.05, 1.02),
           title="Gradient fidelity over training")
    ax.grid(alpha=0.3)
    plain_token_axis(ax)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


KEPT = ("config", "method", "best_valid_ppl", "tokens", "epochs", "steps", "complete", "stopped_by", "data",
        "width", "layers", "cell", "context", "train_seconds", "device", "deviations", "provenance", "folder",
        "loops", "curves")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", nargs="+", help="run folders")
    source.add_argument("--from-json", help="a report's JSON: draw its table and figures again")
    parser.add_argument("--name", default=None, help="base name of the outputs (default: the JSON's name)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the outputs (default: %(default)s; experiments/results only when asked)")
    args = parser.parse_args(argv)
    command = provenance.command_line(argv, __file__) if argv is not None else provenance.command_line()
    runs, unusable = [], []
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        runs = earlier["runs"]
        name = args.name or Path(args.from_json).stem
        for run in runs:
            run.setdefault("curves", {"train": [], "valid": [], "fidelity": []})
            run.setdefault("folder", "?")
    else:
        if not args.name:
            parser.error("--name is required with --runs")
        name = args.name
        for folder in args.runs:
            try:
                runs.append(load_run(Path(folder)))
            except ValueError as error:
                unusable.append(f"{folder}: {error}")
    for line in unusable:
        print(f"not used: {line}")
    if not runs:
        raise SystemExit("report.py: none of the --runs folders holds a finished run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text_table, missing = table(runs)
    document = {"runs": [{k: r.get(k) for k in KEPT} for r in runs], "report": provenance.record(command)}
    (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
    text = (f"# {name}: validation perplexity\n\nPer method: the best validation perplexity of its run (the "
            "mean where several seeds ran, their range in brackets), then the share of the FT-BPTT → BPTT gap "
            "it closes, (FT − method) / (FT − BPTT).  eager-bptt and bptt are both exact BPTT (the model as "
            f"written / through `apply`).  Produced by `{command}`.\n\n{text_table}\n")
    if missing:
        text += "\nRuns with no perplexity:\n" + "".join(f"- {line}\n" for line in missing)
    if unusable:
        text += "\nRuns not used:\n" + "".join(f"- {line}\n" for line in unusable)
    if plot(runs, out / f"{name}-curves.png"):
        text += f"\n![curves]({name}-curves.png)\n"
    else:
        text += "\nNo curves: no run logged a training or validation point.\n"
    if plot_fidelity(runs, out / f"{name}-fidelity.png"):
        text += f"\n![gradient fidelity]({name}-fidelity.png)\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
