"""How close each backward rewrite's gradient is to exact BPTT's, over the training of a
GRU language model (DESIGN.md §7).

One model trains with exact BPTT on PTB words in fixed-length contexts.  Every
``--every`` steps, on the batch it is about to train on, each method's gradient is taken
from a float64 copy of the model applied with that method and compared with exact BPTT
(the exact one once per measurement, through an exact-mode copy): cosine and relative error of the
recurrent weights' gradient (``weight_hh`` of every layer, concatenated) and of the whole
model's.  Adaptive λ is measured from its single-probe estimate (its smoothing state is
put back after every probe).

    python experiments/fidelity.py --out experiments/results/fidelity-cpu

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``; ``--from-json FILE`` draws the table and
the figure again from such a JSON, without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from data import DEFAULT_ROOT, context_batches, load_ptb, positive_int, run_script  # noqa: E402
from methods import apply_options  # noqa: E402
from plots import colour  # noqa: E402

import dsf_compile  # noqa: E402
from dsf_compile.fidelity import compare_gradients, cosine_and_error  # noqa: E402
from dsf_compile.models import RNNLanguageModel  # noqa: E402
from dsf_compile.models.lm import masked_cross_entropy  # noqa: E402

# method labels (methods.py) compared with exact BPTT
# (truncated BPTT with window k costs the VJPs of highway k: equal cost)
METHODS = ["ft", "dsf-linspace", "dsf-adaptive", "highway-k0", "highway-k1", "highway-k2", "highway-k4", "tbptt-w1",
           "tbptt-w2", "tbptt-w4"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/runs/fidelity", help="output path without suffix")
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="folder holding ptb/")
    parser.add_argument("--width", type=positive_int, default=128, help="GRU hidden size (= embedding size)")
    parser.add_argument("--layers", type=positive_int, default=1, help="stacked GRU layers")
    parser.add_argument("--context", type=positive_int, default=64, help="tokens per training sequence (T)")
    parser.add_argument("--batch", type=positive_int, default=32, help="sequences per batch")
    parser.add_argument("--steps", type=positive_int, default=800, help="BPTT training steps")
    parser.add_argument("--every", type=positive_int, default=100, help="measure every this many steps (and at step 0)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the batch order and the probes")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="methods compared with exact BPTT")
    parser.add_argument("--from-json", default="", help="redraw <out>.md and <out>.png from this result file")
    return parser.parse_args(argv)


def recurrent_fidelity(got: dict, want: dict) -> tuple[float, float]:
    """Cosine and relative error of the ``weight_hh`` gradients, concatenated."""
    names = [n for n in want if "weight_hh" in n]
    return cosine_and_error(torch.cat([got[n].flatten() for n in names]), torch.cat([want[n].flatten() for n in names]))


def gradients(model, x, y, pad: int) -> tuple[float, dict]:
    loss = masked_cross_entropy(model(x), y, pad)
    names, params = zip(*model.named_parameters())
    return loss.item(), dict(zip(names, torch.autograd.grad(loss, params)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        write(result, out, json_too=False)
        return result
    command = provenance.command_line(argv, __file__) if argv is not None else provenance.command_line()
    stamp = provenance.record(command)  # the code this process loaded, not what the tree holds at its end
    corpus = load_ptb(args.data_root, max_len=10**9)
    stream = torch.tensor([i for sentence in corpus.train for i in sentence])
    torch.manual_seed(args.seed)
    model = RNNLanguageModel(len(corpus.vocab), args.width, args.layers, "gru")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    probes = {name: dsf_compile.apply(copy.deepcopy(model).double(), compiler="aot_eager", **apply_options(name))
              for name in args.methods}
    exact = dsf_compile.apply(copy.deepcopy(model).double(), "bptt", compiler="aot_eager")
    records, step, started = [], 0, time.perf_counter()
    print(f"GRU LM {args.layers}x{args.width}, PTB words (V={len(corpus.vocab)}), T={args.context}, B={args.batch}: "
          f"{args.steps} BPTT steps, fidelity every {args.every}", flush=True)
    epoch = 0
    while step <= args.steps:
        for x, y in context_batches(stream, args.context, args.batch, shuffle=True, seed=args.seed * 1000 + epoch):
            if step % args.every == 0 or step == args.steps:
                records.append(measure(step, model, probes, exact, x, y, corpus.pad, args.seed + step))
                print(f"step {step}: " + "  ".join(f"{n} {r['recurrent_cosine']:.3f}"
                                                  for n, r in records[-1]["methods"].items()), flush=True)
            if step == args.steps:
                break
            loss = masked_cross_entropy(model(x), y, corpus.pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        else:
            epoch += 1
            continue
        break
    result = {"settings": vars(args), "vocab": len(corpus.vocab), "seconds": time.perf_counter() - started,
              **stamp, "records": records}
    write(result, out, json_too=True)
    return result


def write(result: dict, out: Path, json_too: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if json_too:
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


def measure(step: int, model, probes: dict, exact, x, y, pad: int, seed: int) -> dict:
    """Each method's fidelity on batch (x, y) at the model's current weights: the exact
    gradient once, through the exact-mode compiled copy, then each method's."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    exact.load_state_dict(state)
    loss, want = gradients(exact, x, y, pad)
    row = {"step": step, "loss": loss, "methods": {}}
    for name, probe in probes.items():
        probe.load_state_dict(state)
        torch.manual_seed(seed)  # the same Hutchinson probe for every run of this script
        _, got = gradients(probe, x, y, pad)
        probe._dsf_backend.adaptive_estimates.clear()  # a single-probe λ at every measurement
        fidelity = compare_gradients(apply_options(name)["mode"], list(want), list(got.values()), list(want.values()))
        cosine, error = recurrent_fidelity(got, want)
        row["methods"][name] = {"recurrent_cosine": cosine, "recurrent_relative_error": error,
                                "cosine": fidelity.cosine, "relative_error": fidelity.relative_error}
    return row


def markdown(result: dict) -> str:
    s = result["settings"]
    names = list(result["records"][0]["methods"])
    rows = [[r["step"], f"{r['loss']:.2f}", *(f"{r['methods'][n]['recurrent_cosine']:.2f} / "
                                             f"{r['methods'][n]['recurrent_relative_error']:.2f}" for n in names)]
            for r in result["records"]]
    whole = [["all parameters, mean over steps", "",
              *(f"{sum(r['methods'][n]['cosine'] for r in result['records']) / len(result['records']):.3f}"
                for n in names)]]
    return (
        f"# Gradient fidelity to exact BPTT over training (CPU, float64 probes)\n\n"
        f"GRU LM {s['layers']}×{s['width']} on PTB words (V = {result['vocab']}), T = {s['context']}, "
        f"B = {s['batch']}, trained {s['steps']} steps with exact BPTT (Adam, lr {s['lr']}); at each step below, "
        f"every method's gradient on the batch about to be trained on, against exact BPTT's.  Cells: cosine / "
        f"relative error of the recurrent weights' gradient (`weight_hh`, all layers).  torch {result['torch']}, "
        f"commit {result.get('commit') or 'unknown'}, "
        f"{result['seconds'] / 60:.0f} min.\n\n"
        f"    python experiments/fidelity.py --out <this file without suffix>"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in s.items() if k not in ("out", "methods", "data_root"))
        + "\n\n"
        + tabulate(rows + whole, headers=["step", "loss", *names], tablefmt="github")
        + "\n"
    )


def plot(result: dict, path: Path) -> None:
    """Cosine to BPTT on a linear axis (every method), and 1 − cosine on a log axis, which
    tells apart the methods the first panel draws on top of each other near 1.  Truncated
    BPTT is dashed, in a lighter shade of the highway k of equal cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["records"][0]["methods"])
    steps = [r["step"] for r in result["records"]]
    fig, (linear, log) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name in names:
        cosines = [r["methods"][name]["recurrent_cosine"] for r in result["records"]]
        style = {"color": colour(name), "marker": "o", "markersize": 4, "label": name,
                 "linestyle": "--" if name.startswith("tbptt") else "-"}
        linear.plot(steps, cosines, **style)
        log.plot(steps, [max(1 - c, 1e-9) for c in cosines], **style)
    s = result["settings"]
    linear.set(xlabel="BPTT training step", ylabel="cosine to BPTT (weight_hh gradient)", ylim=(-0.05, 1.02))
    log.set(xlabel="BPTT training step", ylabel="1 − cosine (log scale; lower is closer)", yscale="log")
    for ax in (linear, log):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Gradient fidelity to BPTT, GRU LM {s['layers']}×{s['width']}, PTB words, T={s['context']}")
    fig.legend(*linear.get_legend_handles_labels(), fontsize=8, ncol=(len(names) + 1) // 2, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    run_script(main)
