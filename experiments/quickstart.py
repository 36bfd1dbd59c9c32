"""Train a small GRU language model on Penn Treebank with exact BPTT, FT-BPTT and DSF.

The same ordinary PyTorch model is handed to ``dsf_compile.apply(model, mode=...)`` once
per method; each trains for the same wall-clock budget from the same initialisation and
data order, then all three are evaluated on the validation set and compared.

    python experiments/quickstart.py                  # ~1 minute per method on a CPU
    python experiments/quickstart.py --seconds 300 --hidden 256 --layers 3
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import DEFAULT_ROOT, load_ptb, run_script, sentence_batches  # noqa: E402

import dsf_compile  # noqa: E402
from dsf_compile.models.lm import RNNLanguageModel, masked_cross_entropy  # noqa: E402


def evaluate(model: torch.nn.Module, sentences, pad: int, batch_size: int) -> float:
    """Validation perplexity.  Forward values are the same in every mode, so the model's
    own eager forward is used: no compilation for the no-grad graph."""
    forward = type(model).forward.__get__(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in sentence_batches(sentences, batch_size, pad, shuffle=False):
            logits = forward(x)
            n = int((y != pad).sum())
            total += masked_cross_entropy(logits, y, pad).item() * n
            count += n
    return math.exp(total / count)


def train(mode: str, corpus, args) -> dict:
    torch.manual_seed(args.seed)
    model = RNNLanguageModel(len(corpus.vocab), args.hidden, args.layers, "gru")
    dsf_compile.apply(model, mode, compiler=args.compiler)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps, tokens, losses = 0, 0, []
    first_step_s = None
    start = time.perf_counter()
    timed_from = None
    for x, y in sentence_batches(corpus.train, args.batch, corpus.pad, shuffle=True, seed=args.seed):
        if len(x) < args.batch:
            continue
        loss = masked_cross_entropy(model(x), y, corpus.pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(loss.item())
        if first_step_s is None:
            first_step_s = time.perf_counter() - start
            timed_from = time.perf_counter()
        else:
            tokens += int((y != corpus.pad).sum())
        if steps % args.log_every == 0:
            recent = sum(losses[-args.log_every :]) / args.log_every
            print(f"  [{mode}] step {steps:5d}  loss {recent:.3f}  ppl {math.exp(recent):8.1f}", flush=True)
        if time.perf_counter() - start > args.seconds:
            break
    elapsed = time.perf_counter() - timed_from
    recent = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
    valid = evaluate(model, corpus.valid[: args.valid_sentences], corpus.pad, args.batch)
    return {
        "method": mode,
        "steps": steps,
        "train loss": round(recent, 3),
        "train ppl": round(math.exp(recent), 1),
        "valid ppl": round(valid, 1),
        "tokens/s": round(tokens / elapsed) if elapsed > 0 else 0,
        "first step s": round(first_step_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", "--data", dest="data", default=str(DEFAULT_ROOT),
                        help="folder holding ptb/ (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="training budget per method, first step included")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valid-sentences", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--methods", default="bptt,ft,dsf")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = load_ptb(args.data)
    print(f"PTB: {len(corpus.vocab)} words, {len(corpus.train)} training sentences; "
          f"GRU {args.layers}x{args.hidden}, batch {args.batch}, {args.seconds:.0f} s per method")
    rows = []
    for mode in args.methods.split(","):
        print(f"{mode}:", flush=True)
        rows.append(train(mode, corpus, args))
    print()
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    run_script(main)
