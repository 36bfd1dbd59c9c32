"""Where a training step's time goes: torch.profiler over a few steps of bench.py's rows.

For each method: the step's wall time, the device's busy time (the sum of its kernels,
which tells a launch- or host-bound step from a device-bound one) and the operators
that take the most device time.  Writes ``<out>.md``.

    python experiments/profile_step.py --config wt103 --model nn.GRU --methods eager-bptt dsf-dsf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def profile_method(config: dict, model_kind: str, method: str, steps: int, top: int) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = bench.build(config, model_kind, method, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config["V"], (config["B"], config["T"] + 1), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compilation and warm-up
        step()
    bench.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        bench.sync(device)
        wall = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    table = events.table(sort_by=sort, row_limit=top, max_name_column_width=70)
    bench.release(device)
    return (f"## {config['name']} {model_kind} {method}\n\nstep {wall:.2f} ms wall, device busy {busy:.2f} ms "
            f"(the step's kernel times summed)\n\n```\n{table}\n```\n")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="wt103", choices=list(bench.CONFIGS), help="a bench.py config")
    parser.add_argument("--small", action="store_true", help="bench.py's tiny shapes (a CPU)")
    parser.add_argument("--model", default="nn.GRU", choices=list(bench.FAMILIES), help="model family")
    parser.add_argument("--methods", nargs="+", default=["eager-bptt", "dsf-dsf"], help="bench.py method names")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per method")
    parser.add_argument("--top", type=int, default=25, help="operators listed per method")
    parser.add_argument("--out", default=None, help="write the tables to <out>.md")
    args = parser.parse_args(argv)
    methods = bench.FAMILIES[args.model][1]
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        parser.error(f"--methods {' '.join(unknown)}: the {args.model} rows are {', '.join(methods)}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = {"name": args.config, **(bench.SMALL if args.small else bench.CONFIGS)[args.config]}
    text = "".join(profile_method(config, args.model, m, args.steps, args.top) for m in args.methods)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
