"""The main job: the same GRU language model trained with exact BPTT and, through
``dsf_compile.apply``, with the backward rewrites, side by side on a CPU.

PTB characters in fixed contexts of 256 (long enough for the recurrence to be most of a
step: a 50-symbol head is cheap), a 2×256 GRU, the same initialisation, batches and
number of steps for every method.  The first step of a compiled method (its compilation)
is timed on its own and left out of the rate.  Each method then reports tokens/s, its
speed-up over eager nn.GRU BPTT, validation perplexity and the cosine of its gradient to
exact BPTT's on one batch (``dsf_compile.gradient_fidelity``).

    python experiments/quickstart.py                      # a few minutes on 2 cores
    python experiments/quickstart.py --steps 600 --methods eager-bptt dsf highway-k2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import DEFAULT_ROOT, context_batches, load_ptb_chars, positive_int, run_script  # noqa: E402
from methods import apply_options  # noqa: E402
from progress import Progress  # noqa: E402

import dsf_compile  # noqa: E402
from dsf_compile.models.lm import RNNLanguageModel  # noqa: E402

# "eager-bptt": the model as written, eager PyTorch; the others through apply (methods.py)
METHODS = ["eager-bptt", "bptt", "ft", "dsf", "dsf-adaptive", "highway-k1", "highway-k2"]
DEFAULT_METHODS = ["eager-bptt", "ft", "dsf", "highway-k1"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="folder holding ptb/ (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS,
                        help="methods to train; eager-bptt is the baseline of the speed-ups")
    parser.add_argument("--steps", type=positive_int, default=150, help="training steps of every method")
    parser.add_argument("--context", type=positive_int, default=256, help="characters per sequence (T)")
    parser.add_argument("--batch", type=positive_int, default=16, help="sequences per batch (B)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="GRU width (= embedding width)")
    parser.add_argument("--layers", type=positive_int, default=2, help="stacked GRU layers")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--valid-batches", type=positive_int, default=8,
                        help="validation batches (of --batch × --context)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor",
                        help="what runs the rewritten graphs (aot_eager: no code generation)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    return parser.parse_args(argv)


def build(name: str, vocab: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = RNNLanguageModel(vocab, args.hidden, args.layers, "gru")
    options = apply_options(name)
    if options is not None:
        dsf_compile.apply(model, compiler=args.compiler, **options)
    return model


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def evaluate(model, corpus, args) -> float:
    """Validation perplexity.  Forward values are the same in every mode, so the model's
    own eager forward is used (no compilation for the no-grad graph)."""
    forward = type(model).forward.__get__(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(context_batches(corpus.valid, args.context, args.batch, shuffle=False)):
            if i == args.valid_batches:
                break
            total += torch.nn.functional.cross_entropy(forward(x).flatten(0, 1), y.flatten()).item() * y.numel()
            count += y.numel()
    return math.exp(total / count)


def train(name: str, corpus, args: argparse.Namespace) -> dict:
    model = build(name, len(corpus.vocab), args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = context_batches(corpus.train, args.context, args.batch, shuffle=True, seed=args.seed)
    losses, first_step_s, timed_s = [], 0.0, 0.0
    progress = Progress(f"{name:>12}", 0, args.steps)
    if name != "eager-bptt":
        print(f"{name}: first step, compiling the rewritten graphs (seconds; timed apart) ...", flush=True)
    for step in range(args.steps):
        x, y = next(batches)
        started = time.perf_counter()
        loss = loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        losses.append(loss.item())
        if step == 0:  # compilation: timed on its own; the bar and its ETA start after it
            first_step_s = elapsed
        else:
            timed_s += elapsed
        progress.step(step + 1)
    progress.close()
    print(f"{name}: validating on {args.valid_batches} batches, and measuring the gradient's cosine to BPTT's ...",
          flush=True)
    row = {"method": name, "first step s": round(first_step_s, 1),
           "tokens/s": round((args.steps - 1) * args.batch * args.context / timed_s) if timed_s else None,
           "train loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
           "valid ppl": round(evaluate(model, corpus, args), 3)}
    x, y = next(batches)
    if name == "eager-bptt":
        row["grad cosine to BPTT"] = 1.0  # it is BPTT
    else:
        fidelity = dsf_compile.gradient_fidelity(model, lambda: loss_of(model, x, y))
        row["grad cosine to BPTT"] = round(fidelity.cosine, 3)
        loops = dsf_compile.report(model).loops
        row["loops rewritten"] = len(loops)
    return row


def conclusion(rows: list[dict]) -> str:
    """One sentence on what the numbers say, from the numbers."""
    by = {r["method"]: r for r in rows}
    base = by.get("eager-bptt")
    if base is None or len(rows) < 2:
        return ""
    others = [r for r in rows if r["method"] != "eager-bptt"]
    fastest = max(others, key=lambda r: r["tokens/s"] or 0)
    best = min(others, key=lambda r: r["valid ppl"])
    sentence = (f"At this budget {fastest['method']} trains {fastest['tokens/s'] / base['tokens/s']:.2f}× as fast "
                f"as eager nn.GRU BPTT; the best validation perplexity after the same steps is {best['method']}'s "
                f"({best['valid ppl']:.2f}, BPTT {base['valid ppl']:.2f}).")
    if best["valid ppl"] > base["valid ppl"]:
        sentence += " No approximation matches BPTT per step here: their case is more steps in the same time."
    return sentence + " Perplexities after so few steps rank early training, not final quality."


# what each method is, as the table's legend says it
LEGEND = {
    "eager-bptt": "the model as written, eager PyTorch: exact BPTT through torch's fused nn.GRU (the baseline)",
    "bptt": "exact BPTT through dsf_compile.apply (mode='bptt')",
    "ft": "fully truncated BPTT: each state's gradient is its direct gradient alone (λ = 0)",
    "dsf": "diagonal state feedback: δ_t = g_t + λ ⊙ δ_{t+1} with the paper's λ = linspace(0, 1)",
    "dsf-adaptive": "DSF with λ estimated from the mean diagonal of each step's Jacobian",
    "highway-k1": "Highway-BP, one refinement around the GRU's update-gate path (DESIGN.md §7)",
    "highway-k2": "Highway-BP, two refinements",
}
COLUMNS = ("tokens/s: characters trained per second after the first step; first step s: the first step, which "
           "compiles, timed apart; speed-up: over eager-bptt's tokens/s; valid ppl: perplexity per character on "
           "the validation split after the same steps; grad cosine to BPTT: the cosine between the method's gradient "
           "and exact BPTT's on one batch (1: the same direction); loops rewritten: the recurrent loops apply() "
           "rewrote")


def machine_load() -> tuple[float, int]:
    """The 1-minute load average and the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return os.getloadavg()[0], cores


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    corpus = load_ptb_chars(args.data_root)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"PTB characters ({len(corpus.vocab)} symbols; {len(corpus.train):,} training characters), GRU "
          f"{args.layers}×{args.hidden}, T={args.context}, B={args.batch}, {args.steps} steps per method, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = [train(name, corpus, args) for name in args.methods]
    base = next((r for r in rows if r["method"] == "eager-bptt"), None)
    for row in rows:
        if base is not None and row["tokens/s"] and base["tokens/s"]:
            row["speed-up vs eager BPTT"] = round(row["tokens/s"] / base["tokens/s"], 2)
    headers = ["method", "tokens/s", "speed-up vs eager BPTT", "valid ppl", "train loss", "grad cosine to BPTT",
               "first step s", "loops rewritten"]
    load, cores = machine_load()
    print()
    print(tabulate([[r.get(h, "-") for h in headers] for r in rows], headers=headers))
    print("\n" + "\n".join(f"  {r['method']}: {LEGEND.get(r['method'], r['method'])}" for r in rows))
    print(f"  {COLUMNS}")
    print(f"\nMachine load (1-minute average) {load:.2f} on {cores} cores."
          + (" WARNING: more than its cores: rates are lower than on a quiet machine and the speed-ups less "
             "comparable; run again when it is quiet (experiments/bench.py measures with repeats)."
             if load > cores else ""))
    print("\n" + conclusion(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows, "load": load, "cores": cores},
                                             indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run_script(main)
