"""Run a grid of training runs (method × depth × width × context × cell) from a small JSON
file, one after another on this machine, resumably, then write the report.

    python experiments/sweep.py experiments/sweeps/wiki-depth.json              # run, then report
    python experiments/sweep.py experiments/sweeps/wiki-depth.json --list       # what would run
    python experiments/sweep.py experiments/sweeps/wiki-cpu.json --results experiments/results

A sweep file::

    {"name": "wiki-depth",
     "base": {"config": "wiki", "epochs": 5},            # train.py flags shared by every run
     "grid": {"method": ["bptt", "ft", "dsf"], "layers": [1, 3, 6, 12]}}

Grid keys are train.py flags (``layers``, ``width``, ``context``, ``cell``, ...) and
``method``, a label of ``methods.py``: ``eager-bptt``, ``bptt``, ``ft``, ``dsf``, ``dsf-adaptive``,
``dsf-uniform``, ``highway-k<k>``.  Every run of a sweep reads the same data for the same number of
epochs (and ``max_train_chars``, if set), so each sees the same tokens.  A finished run
is skipped, an interrupted one resumed from its checkpoint (``train.py --resume``), so
calling the sweep again continues it.  Runs go to ``<runs>/<name>/<run>``; the report
(``report.py``: table, curves, fidelity plot if logged) to ``--results`` (default: the
sweep's run folder; ``experiments/results`` only when asked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import train  # noqa: E402
from data import run_script  # noqa: E402
from methods import train_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent


def flags_of(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        if key == "method":
            flags += train_flags(value)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, bool):
            flags += [flag, "true" if value else "false"]
        else:
            flags += [flag, str(value)]
    return flags


def load_sweep(path: Path) -> dict:
    """The sweep file, checked: every flag known to train.py, every method valid."""
    if not path.is_file():
        raise SystemExit(f"sweep file {path} not found")
    sweep = json.loads(path.read_text())
    unknown = set(sweep) - {"name", "base", "grid", "description"}
    if unknown or "name" not in sweep or "grid" not in sweep:
        raise SystemExit(f"{path}: a sweep has 'name', 'grid' and optionally 'base', 'description' "
                         f"(unknown: {sorted(unknown)})")
    known = {**train.CONFIGS["wiki"], **train.RUN_DEFAULTS, **train.RUN_LIMITS, "config": None, "method": None}
    for section in ("base", "grid"):
        for key in sweep.get(section, {}):
            if key not in known or key in ("out", "resume", "feedback", "iterations"):
                raise SystemExit(f"{path}: {section}.{key} is not a train.py setting a sweep may set")
    if "max_steps" in sweep["grid"]:
        raise SystemExit(f"{path}: max_steps is a budget of the whole sweep: set it in 'base', not in 'grid'")
    for method in sweep["grid"].get("method", []):
        try:
            train_flags(method)
        except ValueError as error:
            raise SystemExit(f"{path}: {error}") from None
    return sweep


def runs_of(sweep: dict) -> list[tuple[str, list[str]]]:
    """(run name, train.py flags) for every point of the grid, in grid order."""
    grid = sweep["grid"]
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        name = "-".join(f"{v}" if k == "method" else f"{k}{v}" for k, v in point.items())
        runs.append((name, flags_of({**sweep.get("base", {}), **point})))
    return runs


def status(folder: Path, limit: int) -> str:
    """"done" (complete, or stopped at ``limit``, the ``max_steps`` the sweep gives it; 0:
    none), "resume" (a checkpoint to continue from) or "new"."""
    summary = folder / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done["complete"] or (limit and done["steps"] >= limit):
            return "done"
    return "resume" if (folder / "checkpoint.pt").is_file() else "new"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep's JSON file (experiments/sweeps/*.json)")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="where run folders go: <runs>/<name>/<run>")
    parser.add_argument("--results", default=None, help="where the report goes (default: the sweep's run folder)")
    parser.add_argument("--list", action="store_true", help="print the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    args = parser.parse_args(argv)
    sweep = load_sweep(Path(args.sweep))
    folder = Path(args.runs) / sweep["name"]
    runs = runs_of(sweep)
    limit = int(sweep.get("base", {}).get("max_steps", 0))
    for i, (name, flags) in enumerate(runs, 1):
        state = status(folder / name, limit)
        print(f"[{i}/{len(runs)}] {name}: {state}" + (f"  (train.py {' '.join(flags)})" if args.list else ""),
              flush=True)
        if args.list or args.report_only or state == "done":
            continue
        out = ["--out", str(folder / name)]
        # a resumed run goes on to the sweep's own stopping point, whatever stopped it before
        train.main([*out, "--resume", "--max-steps", str(limit)] if state == "resume" else [*flags, *out])
    finished = [folder / name for name, _ in runs if status(folder / name, limit) == "done"]
    if not args.list and finished:
        report.main(["--runs", *map(str, finished), "--name", sweep["name"],
                     "--out", args.results or str(folder)])
    return finished


if __name__ == "__main__":
    run_script(main)
