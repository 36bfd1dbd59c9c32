"""Training-step benchmark: cuDNN / torch.compile baselines against dsf_compile's modes.

Every row is measured in this one process, side by side, on the same data:

* nn.GRU language model — ``cudnn-bptt`` (eager), ``compile-bptt`` (plain torch.compile,
  default settings: Dynamo leaves nn.GRU to cuDNN behind a graph break), ``dsf-bptt``,
  ``dsf-ft``, ``dsf-dsf`` (``dsf_compile.apply`` with each mode);
* hand-written GRU cell loop — ``eager-bptt``, ``compile-bptt``, ``dsf-dsf``.

Configs (DESIGN.md §4): ``ptb`` (embedding, 3×256 GRU with residual skips, T=64, B=128,
V=10k), ``wt103`` (3×512 transformer-like blocks, T=256, B=128, V=16k), ``long`` (same
blocks, T=1024, B=32), and a sweep of T at a fixed token count.  Metrics per row: median
step ms, tokens/s, peak memory, first-step time, backward share of the step; per config,
the reverse scan alone against its memory floor.  Writes ``<out>.json`` and ``<out>.md``.

    python experiments/bench.py                      # all configs (a GPU)
    python experiments/bench.py --small              # tiny shapes, minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dsf_compile  # noqa: E402
from dsf_compile.models import HandWrittenGRULM, RNNLanguageModel, TransformerLikeRNN  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONFIGS = {
    "ptb": dict(model="stack", width=256, layers=3, T=64, B=128, V=10_000),
    "wt103": dict(model="blocks", width=512, layers=3, T=256, B=128, V=16_000),
    "long": dict(model="blocks", width=512, layers=3, T=1024, B=32, V=16_000),
}
SMALL = {
    "ptb": dict(model="stack", width=32, layers=2, T=12, B=8, V=200),
    "wt103": dict(model="blocks", width=32, layers=2, T=16, B=8, V=200),
}
GRU_METHODS = ("cudnn-bptt", "compile-bptt", "dsf-bptt", "dsf-ft", "dsf-dsf")
CELL_METHODS = ("eager-bptt", "compile-bptt", "dsf-dsf")


def build(config: dict, family: str, method: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "cell":
        model = HandWrittenGRULM(config["V"], config["width"], config["layers"])
    elif config["model"] == "stack":
        model = RNNLanguageModel(config["V"], config["width"], config["layers"])
    else:
        model = TransformerLikeRNN(config["V"], config["width"], config["layers"])
    model = model.to(device)
    if method == "compile-bptt":
        return torch.compile(model)
    if method.startswith("dsf-"):
        return dsf_compile.apply(model, method.removeprefix("dsf-"))
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(config: dict, family: str, method: str, device: str, steps: int, warmup: int) -> dict:
    model = build(config, family, method, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config["V"], (config["B"], config["T"] + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss_of = lambda: nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = loss_of()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_ms, forward_ms = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = loss_of()
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        step_ms.append((t2 - t0) * 1e3)
        forward_ms.append((t1 - t0) * 1e3)
    median = statistics.median(step_ms)
    row = {
        "config": config["name"], "model": "nn.GRU" if family == "gru" else "cell", "method": method,
        "step_ms": median, "tokens_per_s": config["B"] * config["T"] / (median / 1e3),
        "first_step_s": first, "backward_share": 1 - statistics.median(forward_ms) / median,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    if method.startswith("dsf-"):
        row["loops"] = len(dsf_compile.report(model).loops)
    return row


def scan_against_floor(config: dict, device: str, repeats: int = 20) -> dict:
    """The reverse scan alone on (T, B, width) fp32 vs reading g and writing δ once."""
    g = torch.randn(config["T"], config["B"], config["width"], device=device)
    lam = torch.linspace(0, 1, config["width"], device=device)
    copy_src = torch.randn(config["T"] * config["B"] * config["width"], device=device)
    copy_dst = torch.empty_like(copy_src)

    def timed(fn) -> float:
        fn()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    scan_ms = timed(lambda: dsf_compile.reverse_linear_scan(g, lam, True))
    copy_ms = timed(lambda: copy_dst.copy_(copy_src))  # the same bytes moved at this device's copy rate
    return {"config": config["name"], "scan_ms": scan_ms, "floor_ms": copy_ms, "ratio": scan_ms / copy_ms}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU run in minutes")
    parser.add_argument("--sweep", type=int, nargs="*", default=None,
                        help="T values of the sweep at a fixed token count (default 64…4096; none with --small)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="methods not to run (e.g. compile-bptt)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let Inductor reuse earlier compilations (first-step times are then not cold)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with torch.compiler.config.patch(force_disable_caches=not args.warm_caches):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    table = SMALL if args.small else CONFIGS
    configs = [{"name": name, **table[name]} for name in (args.configs or table)]
    sweep = args.sweep if args.sweep is not None else ([] if args.small else [64, 256, 1024, 4096])
    for T in sweep:
        configs.append({"name": f"sweep-T{T}", **CONFIGS["long"], "T": T, "B": max(1, 32 * 1024 // T)})
    rows, scans = [], []
    for config in configs:
        for family, methods in (("gru", GRU_METHODS), ("cell", CELL_METHODS)):
            if family == "cell" and config["name"].startswith("sweep"):
                continue
            for method in methods:
                if method in args.skip:
                    continue
                row = measure(config, family, method, device, args.steps, args.warmup)
                print(json.dumps(row), flush=True)
                rows.append(row)
        scans.append(scan_against_floor(config, device))
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{platform.machine()}"
    out = Path(args.out or ROOT / "results" / f"bench-{name.replace(' ', '-')}{'-small' if args.small else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": name, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "rows": rows, "scan": scans}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else v)
    keys = ["config", "model", "method", "step_ms", "tokens_per_s", "peak_mib", "first_step_s", "backward_share"]
    markdown = (f"# Training step, {name}, torch {torch.__version__}\n\nProduced by `{result['command']}`.\n\n"
                + tabulate([[fmt(r.get(k)) for k in keys] for r in rows], headers=keys, tablefmt="github")
                + "\n\nReverse scan alone vs a copy of the same bytes:\n\n"
                + tabulate([[s["config"], fmt(s["scan_ms"]), fmt(s["floor_ms"]), fmt(s["ratio"])] for s in scans],
                           headers=["config", "scan ms", "floor ms", "ratio"], tablefmt="github") + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
