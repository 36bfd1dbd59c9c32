"""Training-step benchmark: eager / torch.compile baselines against dsf_compile's modes.

Every row is measured in this one process, side by side, on the same data:

* nn.GRU language model — ``eager-bptt`` (torch's fused op: cuDNN on CUDA), ``compile-bptt``
  (plain torch.compile, default settings: Dynamo leaves nn.GRU to cuDNN behind a graph
  break; ``cudnn-bptt`` in results written before 2026-11-23), ``dsf-bptt``,
  ``dsf-ft``, ``dsf-dsf`` (``dsf_compile.apply`` with each mode);
* the same model with the GRU written by hand and stepped in a Python loop
  (``cell="gru-loop"``) — ``eager-bptt``, ``compile-bptt``, ``dsf-dsf``.

Configs (DESIGN.md §4): ``ptb`` (embedding, 3×256 GRU with residual skips, T=64, B=128,
V=10k), ``wt103`` (3×512 transformer-like blocks, T=256, B=128, V=16k), ``long`` (same
blocks, T=1024, B=32), and a sweep of T at a fixed token count (nn.GRU rows only).
The rows of one config and model family are built together and timed in turns
(``--rounds`` rounds of ``--steps`` steps each), so that a drift of the machine hits them
alike.  Metrics per row: median step ms and the range of the rounds' medians, tokens/s,
peak memory (what the model holds plus the most a step adds), first-step time (Inductor
caches off: compilation included), backward share of the step.  Per
config, the reverse scan alone (each implementation, fp32 and bf16) against its memory
floor, a device-to-device copy of the same bytes.  A first step that has not finished
within ``--compile-timeout`` seconds is recorded as such.

Writes ``<out>.json`` and ``<out>.md`` after every row; ``--resume`` keeps the rows
already in ``<out>.json`` and measures only the missing ones (long benchmarks spread
over several runs).

    python experiments/bench.py                      # all configs (a GPU)
    python experiments/bench.py --configs wt103 --resume
    python experiments/bench.py --small              # tiny shapes, minutes on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from methods import apply_options  # noqa: E402

import dsf_compile  # noqa: E402
from dsf_compile import kernels, triton_scan  # noqa: E402
from dsf_compile.models import RNNLanguageModel, TransformerLikeRNN  # noqa: E402
from dsf_compile.ops import chunked_linear_scan, looped_linear_scan, reverse_linear_scan  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONFIGS = {
    "ptb": dict(model="stack", width=256, layers=3, T=64, B=128, V=10_000),
    "wt103": dict(model="blocks", width=512, layers=3, T=256, B=128, V=16_000),
    "long": dict(model="blocks", width=512, layers=3, T=1024, B=32, V=16_000),
    # the CPU's own measurement (issue #12's targets), named explicitly: --configs cpu
    "cpu": dict(model="stack", width=256, layers=2, T=256, B=16, V=1000),
}
SMALL = {
    "ptb": dict(model="stack", width=32, layers=2, T=12, B=8, V=200),
    "wt103": dict(model="blocks", width=32, layers=2, T=16, B=8, V=200),
    "long": dict(model="blocks", width=32, layers=2, T=64, B=2, V=200),
    "cpu": dict(model="stack", width=32, layers=2, T=32, B=4, V=200),
}
SWEEP_TOKENS = 32 * 1024
GRU_METHODS = ("eager-bptt", "compile-bptt", "dsf-bptt", "dsf-ft", "dsf-dsf")
# the backward rewrites beyond fixed λ (DESIGN.md §7), timed when named in --methods
EXTRA_GRU_METHODS = ("dsf-adaptive", "dsf-highway1", "dsf-highway2", "dsf-tbptt2", "dsf-auto")
# each named by the method label (methods.py) it times
APPLY_OPTIONS = {row: apply_options(label) for row, label in
                 zip(EXTRA_GRU_METHODS, ("dsf-adaptive", "highway-k1", "highway-k2", "tbptt-w2", "auto"))}
CELL_METHODS = ("eager-bptt", "compile-bptt", "dsf-dsf")
FAMILIES = {"nn.GRU": ("gru", GRU_METHODS), "cell": ("gru-loop", CELL_METHODS)}


def build(config: dict, model: str, method: str, device: str, compiler: str = "inductor") -> nn.Module:
    torch.manual_seed(0)
    cell = FAMILIES[model][0]
    cls = RNNLanguageModel if config["model"] == "stack" else TransformerLikeRNN
    net = cls(config["V"], config["width"], config["layers"], cell).to(device)
    if method == "compile-bptt":
        return torch.compile(net)
    if method.startswith("dsf-"):
        return dsf_compile.apply(net, compiler=compiler,
                                 **APPLY_OPTIONS.get(method, dict(mode=method.removeprefix("dsf-"))))
    return net


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CompileTimeout` in this (main) thread after ``seconds``."""
    def expire(signum, frame):
        raise CompileTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_out(error: BaseException | None) -> bool:
    """Whether ``error`` is, or was raised because of, a :class:`CompileTimeout` (Dynamo
    wraps exceptions raised while it traces)."""
    while error is not None:
        if isinstance(error, CompileTimeout):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


@dataclasses.dataclass
class Contender:
    """One row being measured: its model's training step and what was timed so far."""

    row: dict
    step: Callable[[], tuple[float, float]] | None = None
    resident: int = 0  # bytes the model holds between steps (weights, optimiser, graphs)
    transient: int = 0  # the most a step allocated on top of what was resident
    times: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    round_medians: list[float] = dataclasses.field(default_factory=list)


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def prepare(config: dict, model_kind: str, method: str, device: str, args: argparse.Namespace) -> Contender:
    """Build one row's model; its first step (compilation included, within
    ``--compile-timeout``) and warm-up steps."""
    row = {"config": config["name"], "model": model_kind, "method": method, "T": config["T"], "B": config["B"],
           "commit": args.commit}
    before = allocated(device)
    model = build(config, model_kind, method, device, args.compiler)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config["V"], (config["B"], config["T"] + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> tuple[float, float]:
        """Step time and forward time, ms.  On CUDA the forward's share is read off
        events, with no synchronisation inside the step (which would idle the device
        while the host starts the backward); the step itself ends synchronised, as a
        training loop that reads its loss does."""
        sync(device)
        t0 = time.perf_counter()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if device == "cuda" else []
        if events:
            events[0].record()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if events:
            events[1].record()
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if events:
            events[2].record()
        sync(device)
        total = (time.perf_counter() - t0) * 1e3
        if events:
            return total, total * events[0].elapsed_time(events[1]) / events[0].elapsed_time(events[2])
        return total, (t1 - t0) * 1e3

    try:
        with time_limit(args.compile_timeout):
            start = time.perf_counter()
            step()
            row["first_step_s"] = time.perf_counter() - start
    except Exception as error:
        if not timed_out(error):
            raise
        row["first_step_s"] = None
        row["status"] = f"first step not finished in {args.compile_timeout:g} s"
        return Contender(row)
    for _ in range(args.warmup):
        step()
    if method.startswith("dsf-"):
        row["loops"] = len(dsf_compile.report(model).loops)
    return Contender(row, step, resident=allocated(device) - before)


def time_round(contender: Contender, steps: int, device: str) -> None:
    """``steps`` timed training steps of one row, and the memory they took."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = [contender.step() for _ in range(steps)]
    contender.times.extend(times)
    contender.round_medians.append(statistics.median(t for t, _ in times))
    if device == "cuda":
        contender.transient = max(contender.transient, torch.cuda.max_memory_allocated() - base)


def finish(contender: Contender, device: str) -> dict:
    """The row's statistics: median step over every timed step, the range of the rounds'
    medians as its spread."""
    row = contender.row
    if not contender.times:
        return row
    median = statistics.median(t for t, _ in contender.times)
    row.update(
        step_ms=median, step_ms_min_round=min(contender.round_medians),
        step_ms_max_round=max(contender.round_medians), rounds=len(contender.round_medians),
        steps=len(contender.times), tokens_per_s=row["B"] * row["T"] / (median / 1e3),
        backward_share=1 - statistics.median(f for _, f in contender.times) / median,
        peak_mib=(contender.resident + contender.transient) / 2**20 if device == "cuda" else None,
    )
    return row


def measure_side_by_side(
    config: dict, model_kind: str, methods: list[str], device: str, args: argparse.Namespace
) -> list[dict]:
    """Every method of one config and model family, all in memory at once: first steps
    one after another, then ``--rounds`` rounds in which each row takes ``--steps``
    steps in turn, so that drifts of the machine (clocks, other load) hit every row alike.
    A row's peak memory is what its model holds plus the most one of its steps added."""
    contenders = [prepare(config, model_kind, method, device, args) for method in methods]
    for _ in range(args.rounds):
        for contender in contenders:
            if contender.step is not None:
                time_round(contender, args.steps, device)
    return [finish(c, device) for c in contenders]


def release(device: str) -> None:
    """Free what one row held before the next is measured."""
    torch._dynamo.reset()
    kernels.clear_graphs()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def timed_ms(fn, inputs: tuple, device: str, repeats: int) -> float:
    fn(*inputs)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*inputs)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def scan_against_floor(config: dict, device: str, repeats: int = 20) -> list[dict]:
    """The reverse scan alone on a ``(T, B, width)`` gradient, each implementation in
    fp32 and bf16, against a copy of the same bytes (read g once, write δ once)."""
    implementations = {"dsf (default)": lambda g, lam: reverse_linear_scan(g, lam, True)}
    if device == "cuda":  # on a CPU the default is the eager loop
        implementations["chunked matmul"] = lambda g, lam: chunked_linear_scan(g, lam, True)
        implementations["eager loop"] = lambda g, lam: looped_linear_scan(g, lam, True)
        for plan in trial_plans(config["T"]):
            name = f"triton {plan.block_t}x{plan.block_c} w{plan.num_warps} segment {plan.segment}"
            implementations[name] = functools.partial(triton_scan.launch_linear_scan, backwards=True, plan=plan)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(config["T"], config["B"], config["width"], device=device, dtype=dtype)
        lam = torch.linspace(0, 1, config["width"], device=device)
        source = g.flatten().clone()
        target = torch.empty_like(source)
        floor = timed_ms(torch.Tensor.copy_, (target, source), device, repeats)
        for name, fn in implementations.items():
            ms = timed_ms(fn, (g, lam), device, repeats)
            rows.append({"config": config["name"], "dtype": str(dtype).removeprefix("torch."), "implementation": name,
                         "elements": g.numel(), "scan_ms": ms, "floor_ms": floor, "ratio": ms / floor})
    return rows


def trial_plans(length: int) -> list[triton_scan.ScanPlan]:
    """Other cuts of the Triton scan than the default one, to tune it from the table."""
    plans = []
    for block_t, block_c, warps in [(16, 32, 2), (32, 32, 4), (32, 64, 4), (64, 64, 8), (32, 128, 8), (16, 128, 4)]:
        for segments in (1, 4, 16):
            segment = triton_scan.segment_length(length, segments, block_t)
            plans.append(triton_scan.ScanPlan(block_t, block_c, warps, segment))
    return list(dict.fromkeys(plans))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU run in minutes")
    parser.add_argument("--sweep", type=int, nargs="*", default=None,
                        help="T values of the sweep at a fixed token count (default 64…4096; none with --small)")
    parser.add_argument("--methods", nargs="*", default=None,
                        choices=sorted({*GRU_METHODS, *CELL_METHODS, *EXTRA_GRU_METHODS}),
                        help="only these methods (e.g. eager-bptt dsf-dsf); "
                             f"{', '.join(EXTRA_GRU_METHODS)} run only when named")
    parser.add_argument("--skip", nargs="*", default=[], help="methods not to run (e.g. compile-bptt)")
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="model families to time: nn.GRU, and cell (the hand-written GRU loop)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of a row in each round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of timing; in each, every row of a config and model takes its steps in turn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each row after its first")
    parser.add_argument("--compile-timeout", type=float, default=480.0,
                        help="seconds a first step (compilation included) may take before the row is given up")
    parser.add_argument("--no-scan", action="store_true", help="skip the scan-alone measurements")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                        help="what runs the applied rows' graphs (aot_eager: no code generation, for dry runs; "
                             "its times are not the library's)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let Inductor reuse earlier compilations (first-step times are then not cold)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in <out>.json")
    parser.add_argument("--out", default=None, help="output path without suffix (default: "
                        "experiments/runs/bench-<device>; pass experiments/results/... to update a committed one)")
    args = parser.parse_args(argv)
    args.command = provenance.command_line(argv, __file__) if argv is not None else provenance.command_line()
    args.commit = provenance.git_commit()["commit"]
    with torch.compiler.config.patch(force_disable_caches=not args.warm_caches):
        return run(args)


def configs_of(args: argparse.Namespace) -> list[dict]:
    table = SMALL if args.small else CONFIGS
    configs = [{"name": name, **table[name]} for name in (args.configs or [n for n in table if n != "cpu"])]
    sweep = args.sweep if args.sweep is not None else ([] if args.small or args.configs else [64, 256, 1024, 4096])
    for T in sweep:
        configs.append({"name": f"sweep-T{T}", **CONFIGS["long"], "T": T, "B": max(1, SWEEP_TOKENS // T)})
    return configs


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = provenance.device_name(device)
    out = Path(args.out or ROOT / "runs" / f"bench-{file_name(name)}{'-small' if args.small else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"tf32": True, "rows": [], "scan": []}
    if args.resume and out.with_suffix(".json").is_file():
        result = json.loads(out.with_suffix(".json").read_text())
    # the latest writer's provenance; each row records the commit that measured it
    result.update(provenance.record(args.command, device), compiler=args.compiler)
    done = {(r["config"], r["model"], r["method"]) for r in result["rows"]}
    for config in configs_of(args):
        for model_kind, (_, methods) in FAMILIES.items():
            if model_kind not in args.models or (model_kind == "cell" and config["name"].startswith("sweep")):
                continue
            named = [m for m in EXTRA_GRU_METHODS if model_kind == "nn.GRU" and args.methods and m in args.methods]
            wanted = [m for m in (*methods, *named) if (args.methods is None or m in args.methods)
                      and m not in args.skip and (config["name"], model_kind, m) not in done]
            if not wanted:
                continue
            rows = measure_side_by_side(config, model_kind, wanted, device, args)
            release(device)
            for row in rows:
                print(json.dumps(row), flush=True)
            result["rows"].extend(rows)
            write(result, out)
        if not args.no_scan and not any(s["config"] == config["name"] for s in result["scan"]):
            result["scan"].extend(scan_against_floor(config, device))
            write(result, out)
    print(out.with_suffix(".md").read_text())
    return result


def file_name(device: str) -> str:
    """A device's name as results' file names spell it (``NVIDIA-H100-80GB-HBM3``)."""
    return device.replace(" ", "-")


def write(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else v)
    keys = ["config", "model", "method", "step_ms", "spread", "tokens_per_s", "peak_mib", "first_step_s",
            "backward_share"]
    speedups = []
    for row in result["rows"]:
        base = next((r for r in result["rows"] if r["config"] == row["config"] and r["model"] == row["model"]
                     and r["method"] == "eager-bptt" and r.get("step_ms")), None)
        speedups.append(base["step_ms"] / row["step_ms"] if base and row.get("step_ms") else None)
    spread = lambda r: f"{r['step_ms_min_round']:.3g}–{r['step_ms_max_round']:.3g}" if "step_ms_min_round" in r else "-"
    table = [[spread(r) if k == "spread" else fmt(r.get(k)) for k in keys] + [fmt(s), r.get("status", "")]
             for r, s in zip(result["rows"], speedups)]
    baseline = "cuDNN" if result["device"] != "cpu" and not result["device"].startswith("cpu") else "torch's fused op"
    dry = result.get("compiler", "inductor") != "inductor"
    text = (f"# Training step, {result['device']}, torch {result['torch']}"
            + (f" (applied rows through {result['compiler']}: a dry run, not the library's speed)" if dry else "")
            + (f", TF32 {'on' if result['tf32'] else 'off'}" if not result["device"].startswith("cpu") else "")
            + f"\n\nProduced by `{result['command']}` at commit {result.get('commit') or 'unknown'}.  "
            "step_ms: median over every timed step; spread: the "
            "lowest and highest median of the timing rounds (rows of a config take turns each round).  "
            f"Speed-up: the eager BPTT row of the same config and model ({baseline} for nn.GRU) over this row.  "
            "Peak: what the model holds between steps plus the most one step allocates on top.\n\n"
            + tabulate(table, headers=[*keys, "speed-up", "status"], tablefmt="github") + "\n")
    if result["scan"]:
        text += ("\n## Reverse scan alone vs a copy of the same bytes (the memory floor)\n\n"
                 + tabulate([[s["config"], s["dtype"], s["implementation"], s["elements"], fmt(s["scan_ms"]),
                              fmt(s["floor_ms"]), fmt(s["ratio"])] for s in result["scan"]],
                            headers=["config", "dtype", "implementation", "elements", "scan ms", "floor ms",
                                     "ratio"], tablefmt="github") + "\n")
    return text


if __name__ == "__main__":
    main()
