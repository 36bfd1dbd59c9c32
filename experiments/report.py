"""Tables and learning curves from training runs.

    python experiments/report.py --runs experiments/runs/ptb-* --name ptb
    python experiments/report.py --runs experiments/runs/wiki-* --name wiki

Reads each run's ``summary.json`` and ``log.jsonl``; writes ``<out>/<name>.json``
(``{"runs": [{"config", "method", "best_valid_ppl", "tokens", "epochs", ...}]}``),
``<out>/<name>.md`` (best validation perplexity per config and method, the gap DSF
closes between FT-BPTT and BPTT, the paper's numbers where they exist, every departure
from the protocol), ``<out>/<name>-curves.png`` (train and validation perplexity) and,
for runs trained with ``--fidelity-every``, ``<out>/<name>-fidelity.png`` (the cosine of
each method's gradient to exact BPTT's over training).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plots import colour, smoothed  # noqa: E402

ROOT = Path(__file__).resolve().parent
# DESIGN.md §4: WikiText-103, 3×512 GRU, transformer-like blocks, context 256, 5 epochs.
PAPER = {("wiki", 3, 512, "gru"): {"bptt": 28.32, "ft": 46.60, "dsf": 31.54}}
METHODS = ("bptt", "ft", "dsf")


def load_run(folder: Path) -> dict:
    """A run's summary and log; raises ``ValueError`` saying why a folder holds no usable run."""
    if not (folder / "summary.json").is_file():
        why = "no summary.json (still running, or stopped before writing it: train.py --resume finishes it)"
        raise ValueError(why if folder.is_dir() else "no such folder")
    summary = json.loads((folder / "summary.json").read_text())
    log_path = folder / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    return {**summary, "folder": str(folder), "log": log}


def gap_closure(ppl: dict) -> float | None:
    """(FT − DSF) / (FT − BPTT); None where it means nothing: a method missing, or FT not
    behind BPTT (no gap to close)."""
    if not all(m in ppl for m in METHODS) or ppl["ft"] <= ppl["bptt"]:
        return None
    return (ppl["ft"] - ppl["dsf"]) / (ppl["ft"] - ppl["bptt"])


def describe_closure(ppl: dict) -> str:
    closure = gap_closure(ppl)
    if closure is not None:
        return f"{100 * closure:.0f}%"
    if all(m in ppl for m in METHODS):
        return "none: FT not behind BPTT"
    return "-"


def plot(runs: list[dict], path: Path) -> None:
    """Training perplexity (smoothed) over tokens and validation perplexity per epoch, a
    fixed colour per method, a line style per model, the paper's numbers as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4))
    models = sorted({model_of(run) for run in runs})
    styles = dict(zip(models, ["-", "--", ":", "-."] * len(models)))
    for run in runs:
        label = f"{run['method']}" + (f" ({model_of(run)})" if len(models) > 1 else "")
        style = dict(color=colour(run["method"]), linestyle=styles[model_of(run)])
        train = [e for e in run["log"] if e["kind"] == "train"]
        valid = [e for e in run["log"] if e["kind"] == "valid"]
        if train:
            train_ax.plot([e["tokens"] for e in train], smoothed([e["ppl"] for e in train]), label=label, **style)
        valid_ax.plot([e["epoch"] for e in valid], [e["valid_ppl"] for e in valid], marker="o", label=label, **style)
    for key in {(r["config"], r["layers"], r["width"], r["cell"]) for r in runs}:
        for method, value in PAPER.get(key, {}).items():
            valid_ax.axhline(value, color=colour(method), linestyle=(0, (4, 4)), linewidth=0.8,
                             label=f"paper {method} {value}")
    train_ax.set(xlabel="training tokens", ylabel="train perplexity (smoothed)", yscale="log", title="training")
    valid_ax.set(xlabel="epoch", ylabel="validation perplexity", yscale="log", title="validation")
    for ax in (train_ax, valid_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(", ".join(models))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_of(run: dict) -> str:
    """The model and data a run trained, as a figure names them."""
    return f"{run['layers']}×{run['width']} {run['cell'].upper()} on {run['data']} ({run['config']} protocol)"


def plot_fidelity(runs: list[dict], path: Path) -> bool:
    """Cosine to exact BPTT over training, one line per run that logged it."""
    logged = [(run, [e for e in run["log"] if e["kind"] == "fidelity"]) for run in runs]
    logged = [(run, entries) for run, entries in logged if entries]
    if not logged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, entries in logged:
        ax.plot([e["tokens"] for e in entries], [e["cosine"] for e in entries], marker=".",
                color=colour(run["method"]), label=f"{run['method']} ({model_of(run)})")
    ax.set(xlabel="training tokens", ylabel="cosine to exact BPTT (all parameters)", ylim=(-0.05, 1.02),
           title="Gradient fidelity over training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders")
    parser.add_argument("--name", required=True, help="base name of the outputs")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    runs, unusable = [], []
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
    keep = ("config", "method", "best_valid_ppl", "tokens", "epochs", "steps", "complete", "data", "width",
            "layers", "cell", "train_seconds", "device", "deviations")
    (out / f"{args.name}.json").write_text(json.dumps({"runs": [{k: r[k] for k in keep} for r in runs]}, indent=1))

    groups: dict[tuple, dict] = defaultdict(dict)
    notes: dict[tuple, set] = defaultdict(set)
    for run in runs:
        key = (run["config"], run["layers"], run["width"], run["cell"])
        if run["best_valid_ppl"] is not None:  # None: stopped before its first validation
            groups[key][run["method"]] = run["best_valid_ppl"]
        notes[key].add(f"{run['epochs']} epochs, {run['tokens']:,} tokens, data {run['data']}, device {run['device']}")
        for name, value in run["deviations"].items():
            notes[key].add(f"{name}={value}")
        if not run["complete"]:
            notes[key].add(f"{run['method']} incomplete")
    rows = []
    for key, ppl in groups.items():
        paper = PAPER.get(key, {})
        paper_closure = gap_closure(paper) if paper else None
        rows.append([
            f"{key[0]} {key[1]}×{key[2]} {key[3]}",
            *(f"{ppl[m]:.2f}" if m in ppl else "-" for m in METHODS),
            describe_closure(ppl),
            " / ".join(f"{paper[m]:.2f}" for m in METHODS) if paper else "-",
            "-" if paper_closure is None else f"{100 * paper_closure:.0f}%",
            "; ".join(sorted(notes[key])),
        ])
    others = sorted({m for ppl in groups.values() for m in ppl if m not in METHODS})  # dsf-adaptive, highway-k1
    for row, ppl in zip(rows, groups.values()):
        row[4:4] = [f"{ppl[m]:.2f}" if m in ppl else "-" for m in others]
    headers = ["config", "BPTT", "FT-BPTT", "DSF", *others, "gap closed", "paper B/FT/DSF", "paper gap", "runs"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)  # keep "221.00" as written
    text = (f"# {args.name}: best validation perplexity\n\nGap closed = (FT − DSF) / (FT − BPTT). "
            f"Produced by `python experiments/report.py --runs {' '.join(args.runs)} --name {args.name}`.\n\n"
            f"{table}\n\n![curves]({args.name}-curves.png)\n")
    if unusable:
        text += "\nRuns not used:\n" + "".join(f"- {line}\n" for line in unusable)
    if plot_fidelity(runs, out / f"{args.name}-fidelity.png"):
        text += f"\n![gradient fidelity]({args.name}-fidelity.png)\n"
    (out / f"{args.name}.md").write_text(text)
    plot(runs, out / f"{args.name}-curves.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
