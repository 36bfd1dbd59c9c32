"""Run a grid of training runs (method × depth × width × context × cell) from a small JSON
file, one after another on this machine, resumably, then write the report.

    python experiments/sweep.py experiments/sweeps/wiki-depth.json              # run, then report
    python experiments/sweep.py experiments/sweeps/wiki-depth.json --list       # what would run
    python experiments/sweep.py experiments/sweeps/wiki-cpu.json --results experiments/results

A sweep file::

    {"name": "wiki-depth",
     "base": {"config": "wiki", "epochs": 5},            # train.py flags shared by every run
     "grid": {"method": ["bptt", "ft", "dsf"], "layers": [1, 3, 6, 12]}}

Grid keys are train.py flags (``layers``, ``width``, ``context``, ``cell``, ``seed``, ...)
and ``method``, a label of ``methods.py`` (``eager-bptt``, ``bptt``, ``ft``, ``dsf``,
``dsf-adaptive``, ``highway-k<k>``, ``tbptt-w<k>``, ``auto``, ...).  ``also``, a list of
points beyond the grid (``{"method": "ft", "seed": 1}``), runs after it.  Every run of a
sweep reads the same data for the same number of epochs (and ``max_train_chars``, if
set), so each sees the same tokens.  A finished run is skipped, an interrupted one resumed
from its checkpoint (``train.py --resume``), so calling the sweep again continues it;
``--shard K/N`` lets N processes share a sweep, each training every N-th run.  Runs go to
``<runs>/<name>/<run>``; the report (``report.py``: table, curves, fidelity plot if
logged) to ``--results`` (default: the sweep's run folder; ``experiments/results`` only
when asked).
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
from methods import METHOD_OPTIONS, train_flags  # noqa: E402

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
    unknown = set(sweep) - {"name", "base", "grid", "also", "description"}
    if unknown or "name" not in sweep or "grid" not in sweep:
        raise SystemExit(f"{path}: a sweep has 'name', 'grid' and optionally 'base', 'also', 'description' "
                         f"(unknown: {sorted(unknown)})")
    if not isinstance(sweep.get("also", []), list) or not all(isinstance(p, dict) for p in sweep.get("also", [])):
        raise SystemExit(f"{path}: 'also' is a list of points, each a dict of settings (a method and a seed, say)")
    known = {**train.CONFIGS["wiki"], **train.RUN_DEFAULTS, **train.RUN_LIMITS, "config": None, "method": None}
    sections = [("base", sweep.get("base", {})), ("grid", sweep["grid"])] + [("also", p) for p in sweep.get("also", [])]
    for section, settings in sections:
        for key in settings:
            if key not in known or key in ("out", "resume", *METHOD_OPTIONS):  # a method label sets its options
                raise SystemExit(f"{path}: {section}.{key} is not a train.py setting a sweep may set")
    if "max_steps" in sweep["grid"]:
        raise SystemExit(f"{path}: max_steps is a budget of the whole sweep: set it in 'base', not in 'grid'")
    for method in [*sweep["grid"].get("method", []), *(p["method"] for p in sweep.get("also", []) if "method" in p)]:
        try:
            train_flags(method)
        except ValueError as error:
            raise SystemExit(f"{path}: {error}") from None
    return sweep


def runs_of(sweep: dict) -> list[tuple[str, list[str]]]:
    """(run name, train.py flags) for every point of the grid, in grid order, then every
    point of ``also``."""
    grid = sweep["grid"]
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    runs = []
    for point in points + list(sweep.get("also", [])):
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


def shard(text: str) -> tuple[int, int]:
    """An argparse ``type`` for ``K/N``: shard K (from 0) of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (shard K of N, from 0), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N, got {text!r}")
    return index, count


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep's JSON file (experiments/sweeps/*.json)")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="where run folders go: <runs>/<name>/<run>")
    parser.add_argument("--results", default=None, help="where the report goes (default: the sweep's run folder)")
    parser.add_argument("--list", action="store_true", help="print the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    parser.add_argument("--shard", default="0/1", type=shard,
                        help="K/N: train only every N-th run from the K-th (N processes, one shard each, share a "
                             "sweep; the report waits for --report-only)")
    args = parser.parse_args(argv)
    sweep = load_sweep(Path(args.sweep))
    folder = Path(args.runs) / sweep["name"]
    runs = runs_of(sweep)
    limit = int(sweep.get("base", {}).get("max_steps", 0))
    index, count = args.shard
    for i, (name, flags) in enumerate(runs, 1):
        state = status(folder / name, limit)
        mine = (i - 1) % count == index
        print(f"[{i}/{len(runs)}] {name}: {state}" + ("" if mine else f" (shard {(i - 1) % count}/{count})")
              + (f"  (train.py {' '.join(flags)})" if args.list else ""), flush=True)
        if args.list or args.report_only or state == "done" or not mine:
            continue
        out = ["--out", str(folder / name)]
        # a resumed run goes on to the sweep's own stopping point, whatever stopped it before
        train.main([*out, "--resume", "--max-steps", str(limit)] if state == "resume" else [*flags, *out])
    finished = [folder / name for name, _ in runs if status(folder / name, limit) == "done"]
    if not args.list and finished and (count == 1 or args.report_only):
        report.main(["--runs", *map(str, finished), "--name", sweep["name"],
                     "--out", args.results or str(folder)])
    return finished


if __name__ == "__main__":
    run_script(main)
