"""First-step (compile) time of a hand-written GRU language model versus sequence length.

For each T, a fresh process builds a 2-layer hand-written GRU LM (a Python loop over a
GRU cell written with Linear layers), compiles it with ``dsf_compile.apply`` or with
plain ``torch.compile``, and times the first forward+backward (tracing, passes and code
generation included) and a second, warm one.  Inductor's caches are disabled, so every
run compiles from scratch.  Writes ``<out>.json`` and ``<out>.md``.

    python experiments/compile_time.py                       # T = 16 64 256 1024, CPU
    python experiments/compile_time.py --T 16 64 --timeout 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent
CHILD = """
import json, sys, time, torch, dsf_compile
from dsf_compile.models import HandWrittenGRULM
T, method, hidden, batch, device = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model = HandWrittenGRULM(1000, hidden, 2).to(device)
tokens = torch.randint(0, 1000, (batch, T), device=device)
if method == "dsf_compile.apply":
    dsf_compile.apply(model, "dsf")
else:
    model = torch.compile(model)
def step():
    model(tokens).logsumexp(-1).mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
start = time.perf_counter(); step(); first = time.perf_counter() - start
start = time.perf_counter(); step(); second = time.perf_counter() - start
loops = len(dsf_compile.report(model).loops) if method == "dsf_compile.apply" else None
print(json.dumps({"first_step_s": first, "second_step_s": second, "loops": loops}))
"""


def run_one(T: int, method: str, args) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", CHILD, str(T), method, str(args.hidden), str(args.batch), args.device]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"T": T, "method": method, "status": f"timed out after {args.timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"T": T, "method": method, "status": "failed: " + " ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"T": T, "method": method, "status": "ok", "wall_s": time.perf_counter() - start, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--methods", nargs="+", default=["dsf_compile.apply", "torch.compile"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", default=str(ROOT / "runs" / "compile-time"),
                        help="output path without suffix (experiments/results/compile-time-cpu for the committed one)")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        timed_out = None
        for T in sorted(args.T):
            if timed_out is not None:
                row = {"T": T, "method": method, "status": f"not run: T={timed_out} already timed out"}
            else:
                row = run_one(T, method, args)
                if row["status"].startswith("timed out"):
                    timed_out = T
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "model": f"2-layer hand-written GRU LM, hidden {args.hidden}, batch {args.batch}, vocab 1000",
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    table = []
    for T in sorted(args.T):
        line = [T]
        for method in args.methods:
            row = next(r for r in rows if r["T"] == T and r["method"] == method)
            line.append(f"{row['first_step_s']:.1f}" if row["status"] == "ok" else row["status"])
        table.append(line)
    headers = ["T", *(f"{m}: first step s" for m in args.methods)]
    markdown = (
        f"# First-step time vs T\n\n{meta['model']}; {meta['device']}; torch {meta['torch']}.\n"
        f"Produced by `{meta['command']}`.\n\n" + tabulate(table, headers=headers, tablefmt="github") + "\n"
    )
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
