"""Every GPU figure of this project from one command, within a time budget.

    python experiments/gpu_suite.py --prepare            # on a CPU with the data: token ids, ≤ 60 MiB
    python experiments/gpu_suite.py --plan               # what fits in one call of 540 s, and in two (H100)
    python experiments/gpu_suite.py --out $OUT --budget-s 540 --phases tests,bench     # on the GPU machine
    python experiments/gpu_suite.py --out /tmp/dry --device cpu --tiny                 # the dry run (CI)

Phases, in this order unless ``--phases`` names others:

* ``tests``: the CUDA tests and ``tests/test_ops.py`` under a time cap → ``tests.json``
  (passed / failed / skipped, each failure's test id and last lines);
* ``bench``: ``bench.py``'s ptb, wt103 and long configs, rows cuDNN BPTT (``eager-bptt``),
  ``apply`` bptt / ft / dsf / highway k=1 / adaptive, the hand-written GRU loop eager and
  under ``apply`` dsf, the scan against its memory floor; rounds sized to the budget →
  ``bench-<device>.{json,md}``;
* ``ptb``: the paper's PTB protocol (DESIGN.md §5) for eager BPTT (cuDNN), ft, dsf and
  highway-k1, each ``train.py`` run on the unmodified model → ``ptb.{json,md}``,
  ``ptb-curves.png``;
* ``wiki``: the wiki protocol on the stand-in for the same methods, as many whole epochs
  as the budget allows (5 is the paper's; validation four times an epoch) →
  ``wiki.{json,md}``, ``wiki-curves.png``.

Before each phase (and each training run) the suite estimates its duration — from this
call's own bench rows once the bench phase has run, else from the committed bench of the
device (the H100's where none is committed), rows it lacks scaled as their ``basis`` says —
and skips, with the reason in ``suite.json``, what will not fit in what is left of
``--budget-s``.  Every phase runs as its own processes under a deadline and writes its
files the moment it ends (a training phase after each run), so a call killed at its limit
still returns every finished phase; ``suite.json`` is rewritten after each.  Every file
records the git commit, torch version, device name and exact command.  A lent GPU machine
returns at most 8 files from ``$OUT``: run ``tests,bench`` in one call and ``ptb``,
``wiki`` in calls of their own (``--plan`` shows what fits).  Training runs' own folders
(logs, checkpoints) go to ``--work``, outside ``--out``; the reports' JSON keeps the curves.

``--prepare`` (on a machine with ``../shared/data``) writes the PTB sentences and the
stand-in's BPE-16k ids, about 52 MB, into ``--prepared`` (default ``experiments/prepared``,
ignored by git; name it in the device call's ``carry``), with a manifest holding the commit
it was built at: the GPU machine receives the working tree without ``.git``, so the suite
records that commit there.  ``--tiny`` runs every phase at toy sizes (``--prepare --tiny``
builds toy data) and writes nothing into the checkout.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from data import DEFAULT_CACHE, DEFAULT_ROOT, load_ptb, load_wiki, read_manifest, run_script, write_prepared  # noqa: E402
from methods import train_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_PREPARED = ROOT / "prepared"
PHASES = ("tests", "bench", "ptb", "wiki")
TEST_FILES = ("tests/test_cuda.py", "tests/test_ops.py")
BENCH_CONFIGS = ("ptb", "wt103", "long")
BENCH_METHODS = ("eager-bptt", "dsf-bptt", "dsf-ft", "dsf-dsf", "dsf-highway1", "dsf-adaptive")
PROTOCOL_METHODS = ("eager-bptt", "ft", "dsf", "highway-k1")
# the bench row that times a training method's step (the protocols' models are the bench's)
BENCH_ROW = {"eager-bptt": "eager-bptt", "bptt": "dsf-bptt", "ft": "dsf-ft", "dsf": "dsf-dsf",
             "highway-k1": "dsf-highway1", "dsf-adaptive": "dsf-adaptive"}
PROTOCOL_BENCH_CONFIG = {"ptb": "ptb", "wiki": "wt103"}
REFERENCE_DEVICE = "NVIDIA H100 80GB HBM3"
RESERVE_S = 20.0  # kept back from every cap: the phase's files, suite.json, the exit
VALIDATIONS_PER_EPOCH = 4  # wiki
PAPER_WIKI_EPOCHS = 5

# Rounds × steps (and warm-up steps) of the bench, largest first: the first that fits.
BENCH_SCHEDULES = ((4, 8, 2), (3, 6, 2), (2, 4, 1))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What differs between the real suite and its dry run."""

    tests_s: float  # assumed duration of the tests phase (no GPU run of them is recorded)
    tests_cap_s: float
    scan_s: float  # the scan-alone measurements of one bench config (Triton compiles every plan)
    startup_s: float  # a training process: interpreter, torch, data, model
    bench_flags: tuple[str, ...]
    bench_configs: tuple[str, ...]
    ptb_epochs: int
    ptb_flags: tuple[str, ...]
    wiki_flags: tuple[str, ...]
    wiki_valid_batches: int | None  # None: the whole validation set
    wiki_max_epochs: int
    bench_schedules: tuple[tuple[int, int, int], ...]  # rounds, steps, warm-up steps: the first that fits


GPU = Sizes(tests_s=180, tests_cap_s=300, scan_s=60, startup_s=20, bench_flags=("--compile-timeout", "240"),
            bench_configs=BENCH_CONFIGS, ptb_epochs=30, ptb_flags=(), wiki_flags=(), wiki_valid_batches=None,
            wiki_max_epochs=PAPER_WIKI_EPOCHS, bench_schedules=BENCH_SCHEDULES)
TINY = Sizes(tests_s=60, tests_cap_s=240, scan_s=5, startup_s=8,
             bench_flags=("--small", "--compile-timeout", "120", "--compiler", "aot_eager"), bench_configs=("ptb",),
             ptb_epochs=2,
             ptb_flags=("--width", "16", "--layers", "2", "--batch", "8", "--milestones", "1", "--log-every", "5",
                        "--compiler", "aot_eager"),
             wiki_flags=("--width", "16", "--layers", "1", "--batch", "4", "--context", "16", "--log-every", "5",
                         "--compiler", "aot_eager"),
             wiki_valid_batches=3, wiki_max_epochs=2, bench_schedules=((1, 2, 0),))
# toy sizes on a CPU: no committed bench to read, so these until this call's bench has run
TINY_ROW = (40.0, 25.0)  # step ms, first step s


@dataclasses.dataclass
class Row:
    step_ms: float
    first_step_s: float
    basis: str


class CostModel:
    """Step and first-step times of bench rows on the target device, each with its basis:
    this call's own bench rows once measured; else the committed bench of the device (of
    the H100 where none is committed); rows missing there scaled from ones present."""

    def __init__(self, device: str, tiny: bool) -> None:
        self.tiny = tiny
        self.rows: dict[tuple[str, str, str], Row] = {}
        self.ratios = self._cpu_ratios()
        if tiny:
            return
        path = ROOT / "results" / f"bench-{device.replace(' ', '-')}.json"
        source = "committed bench of this device"
        if not path.is_file():
            path = ROOT / "results" / f"bench-{REFERENCE_DEVICE.replace(' ', '-')}.json"
            source = f"committed H100 bench (none for {device})"
        self.source = path
        self.learn(json.loads(path.read_text()), source)

    @staticmethod
    def _cpu_ratios() -> dict[str, float]:
        """Step time of each extra backward rewrite over dsf's, on the CPU bench (the only
        machine that has timed them side by side)."""
        rows = json.loads((ROOT / "results" / "bench-cpu-modes.json").read_text())["rows"]
        step = {r["method"]: r["step_ms"] for r in rows if r["model"] == "nn.GRU" and r.get("step_ms")}
        return {m: step[m] / step["dsf-dsf"] for m in ("dsf-highway1", "dsf-adaptive") if m in step}

    def learn(self, bench: dict, basis: str) -> None:
        for r in bench["rows"]:
            if r.get("step_ms") and r.get("first_step_s") is not None:
                method = "eager-bptt" if r["method"] == "cudnn-bptt" else r["method"]  # the older name
                self.rows[r["config"], r["model"], method] = Row(r["step_ms"], r["first_step_s"], basis)

    def row(self, config: str, model: str, method: str) -> Row:
        found = self.rows.get((config, model, method))
        if found is not None:
            return found
        if model == "nn.GRU" and method in self.ratios and (config, model, "dsf-dsf") in self.rows:
            dsf = self.rows[config, model, "dsf-dsf"]
            ratio = self.ratios[method]
            return Row(dsf.step_ms * ratio, dsf.first_step_s, f"{method} = dsf × {ratio:.2f} (their CPU bench ratio)")
        if self.tiny:
            return Row(*TINY_ROW, "assumed (toy sizes, before this call's bench)")
        raise KeyError(f"no estimate for the bench row {config} {model} {method}")


# the hand-written GRU loop is timed where the committed bench has it: at long its eager
# BPTT would take about 2.7 s a step on an H100
CELL_CONFIGS = ("ptb", "wt103")


def bench_models(config: str) -> list[str]:
    return ["nn.GRU", "cell"] if config in CELL_CONFIGS or config not in BENCH_CONFIGS else ["nn.GRU"]


def bench_rows(config: str) -> list[tuple[str, str]]:
    """(model, method) of every row the bench phase times for ``config``."""
    rows = [("nn.GRU", m) for m in BENCH_METHODS]
    return rows + ([("cell", m) for m in ("eager-bptt", "dsf-dsf")] if "cell" in bench_models(config) else [])


@dataclasses.dataclass
class Estimate:
    seconds: float
    basis: str


def bench_estimate(cost: CostModel, sizes: Sizes, config: str, schedule: tuple[int, int, int]) -> Estimate:
    rounds, steps, warmup = schedule
    rows = [cost.row(config, *row) for row in bench_rows(config)]
    seconds = sizes.startup_s + sizes.scan_s + sum(r.first_step_s + (warmup + rounds * steps) * r.step_ms / 1e3
                                                   for r in rows)
    return Estimate(seconds, "; ".join(sorted({r.basis for r in rows})))


@dataclasses.dataclass
class RunPlan:
    """One training run of a protocol phase and its estimated duration."""

    method: str
    epochs: int
    steps_per_epoch: int
    valid_every: int
    estimate: Estimate


def training_run_estimate(cost: CostModel, sizes: Sizes, phase: str, method: str, epochs: int,
                          steps_per_epoch: int, valid_batches: int, validations: int) -> Estimate:
    """A training run: start-up, compilation (twice for ptb: its sentence batches take a
    second length, compiled once more with T dynamic), every step at the bench config's
    rate (ptb's T=64 bounds its shorter batches), validations at about a third of a step
    per batch (a forward)."""
    row = cost.row(PROTOCOL_BENCH_CONFIG[phase], "nn.GRU", BENCH_ROW[method])
    compiles = 2 if phase == "ptb" and method != "eager-bptt" else 1
    seconds = (sizes.startup_s + compiles * row.first_step_s + epochs * steps_per_epoch * row.step_ms / 1e3
               + validations * valid_batches * row.step_ms / 3e3)
    return Estimate(seconds, row.basis)


class Suite:
    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.command = args, command
        self.sizes = TINY if args.tiny else GPU
        self.device = args.device
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        self.manifest = read_manifest(args.prepared) if {"ptb", "wiki"} & set(args.phases) else None
        commit = self._commit()
        self.env = self._environment(commit)
        self.device_name = self._device_name()
        self.cost = CostModel(self.device_name, args.tiny)
        self.summary = {
            **provenance.record(command, self.device), **commit,
            "budget_s": args.budget_s, "tiny": args.tiny,
            "phases": [{"phase": p, "status": "pending"} for p in args.phases],
        }

    # --- where, what, with which commit ---

    def _commit(self) -> dict:
        """The commit the suite records: git's where it answers, else the one ``--prepare``
        wrote beside the data."""
        commit = provenance.git_commit()
        if commit["commit"] is None and (Path(self.args.prepared) / "manifest.json").is_file():
            prepared = read_manifest(self.args.prepared)
            commit = {"commit": prepared.get("commit"), "dirty": prepared.get("dirty"),
                      "commit_source": "the manifest of --prepare (no git here; the code may be newer)"}
        return commit

    def _environment(self, commit: dict) -> dict:
        """Children import this checkout (no install needed) and record the suite's commit."""
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if commit["commit"]:
            env["DSF_COMMIT"] = commit["commit"]
            env["DSF_COMMIT_SOURCE"] = commit["commit_source"]
            if commit["dirty"] is not None:
                env["DSF_COMMIT_DIRTY"] = "1" if commit["dirty"] else "0"
        return env

    def _device_name(self) -> str:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu --tiny for a dry run)")
        return provenance.device_name(self.device)

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def write_summary(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "suite.json").write_text(json.dumps(self.summary, indent=1) + "\n")

    def entry(self, phase: str) -> dict:
        return next(e for e in self.summary["phases"] if e["phase"] == phase)

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        print(f"gpu suite on {self.device_name}: phases {', '.join(self.args.phases)}, "
              f"budget {self.args.budget_s:g} s, commit {self.summary['commit'] or 'unknown'}; runs in {self.work}",
              flush=True)
        self.write_summary()
        for phase in self.args.phases:
            entry = self.entry(phase)
            started = time.monotonic()
            entry["status"] = "running"
            self.write_summary()
            try:
                entry.update(getattr(self, f"phase_{phase}")())
            except Exception as error:  # one phase's crash must not lose the others'
                entry.update(status="failed", error=f"{type(error).__name__}: {error}")
            entry["seconds"] = round(time.monotonic() - started, 1)
            self.write_summary()
            print(f"== {phase}: {entry['status']} in {entry['seconds']:g} s"
                  + (f" ({entry.get('reason') or entry.get('error') or entry.get('verdict')})"
                     if entry["status"] != "done" or entry.get("verdict") else ""), flush=True)
        return self.summary

    def skipped(self, estimate: Estimate, what: str) -> dict | None:
        """A skip entry if ``estimate`` does not fit what is left, else None."""
        if estimate.seconds <= self.left():
            return None
        return {"status": "skipped", "estimate_s": round(estimate.seconds), "basis": estimate.basis,
                "reason": f"{what} needs about {estimate.seconds:.0f} s ({estimate.basis}); "
                          f"{max(0, self.left()):.0f} s are left of the budget"}

    # --- phases ---

    def phase_tests(self) -> dict:
        estimate = Estimate(self.sizes.tests_s, "assumed: no run of these tests on this device is recorded")
        if (skip := self.skipped(Estimate(min(estimate.seconds, self.sizes.tests_cap_s), estimate.basis),
                                 "the tests")):
            return skip
        cap = min(self.sizes.tests_cap_s, self.left())
        log = self.work / "tests.jsonl"
        log.unlink(missing_ok=True)
        env = dict(self.env, DSF_TEST_LOG=str(log))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "pytest_jsonl", "-p", "no:cacheprovider",
                   *TEST_FILES]
        finished = run_child(command, cap, env)
        outcomes = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        counts = collections.Counter(o["outcome"] for o in outcomes)
        skipped = collections.Counter(o.get("reason", "?") for o in outcomes if o["outcome"] == "skipped")
        result = {
            **self.stamp(" ".join(["python", *command[1:]])), "cap_s": round(cap), "timed_out": finished.timed_out,
            "exit_code": finished.returncode, "passed": counts["passed"], "failed": counts["failed"],
            "skipped": counts["skipped"], "skip_reasons": dict(skipped),
            "failures": [{"id": o["id"], "when": o["when"], "lines": o["lines"]} for o in outcomes
                         if o["outcome"] == "failed"],
            "output_tail": finished.tail if (finished.returncode not in (0, 1) or finished.timed_out) else [],
        }
        (self.out / "tests.json").write_text(json.dumps(result, indent=1) + "\n")
        verdict = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        if finished.timed_out:
            return {"status": "failed", "reason": f"stopped at its cap of {cap:.0f} s after: {verdict}",
                    "verdict": verdict, "files": ["tests.json"]}
        if finished.returncode not in (0, 1):  # 1: tests failed; anything else: pytest itself did
            return {"status": "failed", "reason": f"pytest exited with {finished.returncode}: "
                    + " / ".join(finished.tail[-3:]), "verdict": verdict, "files": ["tests.json"]}
        return {"status": "done", "verdict": verdict, "files": ["tests.json"]}

    def phase_bench(self) -> dict:
        configs = list(self.args.bench_configs or self.sizes.bench_configs)
        schedule, fitting = None, []
        for candidate in self.sizes.bench_schedules:
            estimates = [bench_estimate(self.cost, self.sizes, c, candidate) for c in configs]
            if sum(e.seconds for e in estimates) <= self.left() or candidate == self.sizes.bench_schedules[-1]:
                schedule = candidate
                break
        budget = self.left()
        for config, estimate in zip(configs, estimates):
            if estimate.seconds > budget:
                break
            fitting.append((config, estimate))
            budget -= estimate.seconds
        left_out = configs[len(fitting) :]
        if not fitting:
            return self.skipped(estimates[0], f"the bench's {configs[0]} config") or {}
        rounds, steps, warmup = schedule
        name = f"bench-{self.device_name.replace(' ', '-')}"
        target = self.out / name
        details = {"schedule": {"rounds": rounds, "steps": steps, "warmup": warmup},
                   "estimates": {c: round(e.seconds) for c, e in fitting}, "basis": fitting[0][1].basis,
                   "files": [f"{name}.json", f"{name}.md"]}
        problems = []
        for config, _ in fitting:
            command = [sys.executable, str(ROOT / "bench.py"), *self.sizes.bench_flags, "--configs", config,
                       "--sweep", "--models", *bench_models(config), "--methods", *BENCH_METHODS,
                       "--steps", str(steps), "--rounds", str(rounds), "--warmup", str(warmup), "--resume",
                       "--out", str(target)]
            finished = run_child(command, self.left(), self.env)
            if finished.timed_out or finished.returncode:
                problems.append(f"{config}: " + ("stopped at the budget" if finished.timed_out else
                                                 f"exit {finished.returncode}: " + " / ".join(finished.tail[-3:])))
                if finished.timed_out:
                    break
        if target.with_suffix(".json").is_file():
            self.cost.learn(json.loads(target.with_suffix(".json").read_text()), "this call's bench")
        if left_out:
            more = sum(e.seconds for e in estimates[len(fitting) :])
            details["left_out"] = f"configs {', '.join(left_out)}: they need {more:.0f} s more than the budget left"
        if problems:
            return {"status": "failed", "reason": "; ".join(problems), **details}
        return {"status": "done", **details}

    def phase_ptb(self) -> dict:
        manifest = self.manifest["ptb"]
        batch = self.flag_value("ptb", "--batch", 128)
        epochs = self.sizes.ptb_epochs
        steps_per_epoch = manifest["sentences"]["train"] // batch
        valid_batches = math.ceil(manifest["sentences"]["valid"] / batch)
        plans = [RunPlan(m, epochs, steps_per_epoch, 0,
                         training_run_estimate(self.cost, self.sizes, "ptb", m, epochs, steps_per_epoch,
                                               valid_batches, epochs))
                 for m in self.args.methods]
        return self.train_all("ptb", plans, ["--config", "ptb", *self.sizes.ptb_flags])

    def phase_wiki(self) -> dict:
        manifest = self.manifest["wiki"]
        batch = self.flag_value("wiki", "--batch", 128)
        context = self.flag_value("wiki", "--context", 256)
        steps_per_epoch = ((manifest["tokens"]["train"] - 1) // context) // batch
        valid_batches = self.sizes.wiki_valid_batches or math.ceil(((manifest["tokens"]["valid"] - 1) // context)
                                                                    / batch)
        valid_every = max(1, steps_per_epoch // VALIDATIONS_PER_EPOCH)

        def plans_for(epochs: int) -> list[RunPlan]:
            validations = epochs * math.ceil(steps_per_epoch / valid_every)
            return [RunPlan(m, epochs, steps_per_epoch, valid_every,
                            training_run_estimate(self.cost, self.sizes, "wiki", m, epochs, steps_per_epoch,
                                                  valid_batches, validations))
                    for m in self.args.methods]

        epochs = max((n for n in range(1, self.sizes.wiki_max_epochs + 1)
                      if sum(p.estimate.seconds for p in plans_for(n)) <= self.left()), default=0)
        if epochs == 0:
            one = plans_for(1)
            return self.skipped(Estimate(sum(p.estimate.seconds for p in one), one[0].estimate.basis),
                                f"one epoch of {', '.join(self.args.methods)}") or {}
        extra = ["--config", "wiki", "--vocab", str(manifest["vocab"]), *self.sizes.wiki_flags]
        if self.sizes.wiki_valid_batches:
            extra += ["--valid-batches", str(self.sizes.wiki_valid_batches)]
        result = self.train_all("wiki", plans_for(epochs), extra)
        result["epochs"] = epochs
        result["epochs_why"] = (f"{epochs} of the paper's {PAPER_WIKI_EPOCHS}: the most whole epochs of every method "
                                "that fit in the budget left" if epochs < PAPER_WIKI_EPOCHS else "the paper's")
        return result

    def flag_value(self, phase: str, flag: str, default: int) -> int:
        flags = list(self.sizes.ptb_flags if phase == "ptb" else self.sizes.wiki_flags)
        return int(flags[flags.index(flag) + 1]) if flag in flags else default

    def train_all(self, phase: str, plans: list[RunPlan], flags: list[str]) -> dict:
        """Each planned run that fits in what is left, one after another, its report
        written after each; a run past its estimate stops itself at the budget
        (``--time-limit``), validated and marked incomplete."""
        runs, skipped, problems = [], [], []
        files = [f"{phase}.json", f"{phase}.md", f"{phase}-curves.png"]
        for plan in plans:
            skip = self.skipped(plan.estimate, f"the {plan.method} run ({plan.epochs} epochs)")
            if skip:
                skipped.append({"method": plan.method, "reason": skip["reason"]})
                continue
            folder = self.work / f"{phase}-{plan.method}"
            shutil.rmtree(folder, ignore_errors=True)
            command = [sys.executable, str(ROOT / "train.py"), *flags, *train_flags(plan.method),
                       "--epochs", str(plan.epochs), "--prepared", str(self.args.prepared), "--device", self.device,
                       "--save-every", "0", "--time-limit", f"{max(1.0, self.left()):.0f}", "--out", str(folder)]
            if plan.valid_every:
                command += ["--valid-every", str(plan.valid_every)]
            started = time.monotonic()
            # a backstop past train.py's own time limit, for a run stuck inside a step
            finished = run_child(command, self.left() + RESERVE_S / 2, self.env)
            summary = folder / "summary.json"
            record = {"method": plan.method, "estimate_s": round(plan.estimate.seconds),
                      "seconds": round(time.monotonic() - started, 1)}
            if summary.is_file():
                done = json.loads(summary.read_text())
                record.update(complete=done["complete"], steps=done["steps"], best_valid_ppl=done["best_valid_ppl"])
                runs.append(folder)
            else:
                problems.append(f"{plan.method}: " + ("killed at the budget" if finished.timed_out else
                                                      f"exit {finished.returncode}: " + " / ".join(finished.tail[-3:])))
            self.entry(phase).setdefault("runs", []).append(record)
            if runs:
                self.report(phase, runs)
            self.write_summary()
        result = {"basis": plans[0].estimate.basis if plans else "", "files": files if runs else []}
        if skipped:
            result["skipped_runs"] = skipped
        incomplete = [r["method"] for r in self.entry(phase).get("runs", []) if r.get("complete") is False]
        if problems or not runs:
            reason = "; ".join(problems) or "no run fits: " + "; ".join(r["reason"] for r in skipped)
            return {"status": "failed" if problems else "skipped", "reason": reason, **result}
        if incomplete:
            result["reason"] = f"stopped at the budget before its end: {', '.join(incomplete)}"
        return {"status": "done", **result}

    def report(self, phase: str, runs: list[Path]) -> None:
        command = [sys.executable, str(ROOT / "report.py"), "--runs", *map(str, runs), "--name", phase,
                   "--out", str(self.out)]
        finished = run_child(command, max(30.0, self.left()), self.env, echo=False)
        if finished.returncode:
            raise RuntimeError(f"report.py failed: {' / '.join(finished.tail[-3:])}")

    def stamp(self, command: str) -> dict:
        return {**{k: self.summary[k] for k in ("commit", "dirty", "commit_source", "torch", "device")},
                "command": command}


@dataclasses.dataclass
class Finished:
    returncode: int | None
    timed_out: bool
    tail: list[str]


def run_child(command: list[str], timeout: float, env: dict, echo: bool = True) -> Finished:
    """Run ``command`` in its own process group, its output echoed and its last lines kept;
    the whole group killed past ``timeout`` seconds."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)

    def pump() -> None:
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        process.wait(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    reader.join(timeout=5)
    return Finished(process.returncode, timed_out, list(tail))


# --- the plan: what fits in a call ---


def plan(args: argparse.Namespace) -> str:
    """The phases' estimates on ``--plan-device`` and how they pack into one call of
    ``--budget-s``, and into two and three, each call with the command that runs it."""
    sizes = GPU
    cost = CostModel(args.plan_device, tiny=False)
    counts = _manifest_for_plan(args.prepared)
    budget = args.budget_s - RESERVE_S
    smallest = BENCH_SCHEDULES[-1]
    bench = {c: bench_estimate(cost, sizes, c, smallest) for c in BENCH_CONFIGS}
    ptb = {m: training_run_estimate(cost, sizes, "ptb", m, 30, counts["ptb_steps"], counts["ptb_valid"], 30)
           for m in PROTOCOL_METHODS}
    wiki_epochs = {n: sum(training_run_estimate(cost, sizes, "wiki", m, n, counts["wiki_steps"], counts["wiki_valid"],
                                                n * VALIDATIONS_PER_EPOCH).seconds for m in PROTOCOL_METHODS)
                   for n in range(1, PAPER_WIKI_EPOCHS + 1)}
    bases = sorted({part for e in [*bench.values(), *ptb.values()] for part in e.basis.split("; ")})
    lines = [f"Plan for {args.plan_device}: estimates from {cost.source.name}; calls of {args.budget_s:g} s, "
             f"{RESERVE_S:g} s of each kept back.", "",
             f"  tests          {sizes.tests_s:5.0f} s  assumed: no run of these tests on a GPU is recorded"]
    for config, estimate in bench.items():
        rows = collections.Counter(model for model, _ in bench_rows(config))
        lines.append(f"  bench {config:<8} {estimate.seconds:5.0f} s  "
                     + " + ".join(f"{n} {model} rows" for model, n in rows.items())
                     + f", {smallest[0]} rounds of {smallest[1]} steps (more where the budget allows), the scan")
    lines.append(f"  ptb            {sum(e.seconds for e in ptb.values()):5.0f} s  30 epochs of {counts['ptb_steps']} "
                 "steps: " + ", ".join(f"{m} {e.seconds:.0f}" for m, e in ptb.items()))
    lines.append(f"  wiki           {wiki_epochs[1]:5.0f} s  1 epoch of {counts['wiki_steps']} steps of the four "
                 "methods; " + ", ".join(f"{n} epochs {s:.0f}" for n, s in wiki_epochs.items() if n > 1))
    lines += ["", "  estimated as: " + "; ".join(bases), f"  steps per epoch: {counts['source']}"]
    items = [("tests", None, sizes.tests_s), *(("bench", c, e.seconds) for c, e in bench.items()),
             ("ptb", None, sum(e.seconds for e in ptb.values()))]
    for calls in (1, 2):
        lines += ["", f"{calls} call{'s' * (calls > 1)} of {args.budget_s:g} s:"]
        lines += _pack(items, wiki_epochs, budget, calls, args.budget_s)
    every = next((n for n in range(3, 9) if "does not fit" not in "".join(_pack(items, wiki_epochs, budget, n,
                                                                                 args.budget_s))), None)
    if every:
        lines += ["", f"Every phase: {every} calls of {args.budget_s:g} s:"]
        lines += _pack(items, wiki_epochs, budget, every, args.budget_s)
    return "\n".join(lines)


def _pack(items: list[tuple[str, str | None, float]], wiki_epochs: dict[int, float], budget: float, calls: int,
          budget_s: float) -> list[str]:
    """``items`` (phase, bench config, seconds) in order, each into the first call with
    room; then the wiki phase into the call with the most room, with as many epochs as
    fit there.  Each call as the command that runs it."""
    left = [budget] * calls
    placed: list[list[tuple[str, str | None, float]]] = [[] for _ in range(calls)]
    missing = []
    for item in items:
        call = next((i for i in range(calls) if item[2] <= left[i]), None)
        if call is None:
            missing.append(item)
            continue
        placed[call].append(item)
        left[call] -= item[2]
    roomiest = max(range(calls), key=lambda i: left[i])
    epochs = max((n for n, s in wiki_epochs.items() if s <= left[roomiest]), default=0)
    if epochs:
        placed[roomiest].append(("wiki", f"{epochs} epoch{'s' * (epochs > 1)}", wiki_epochs[epochs]))
    else:
        missing.append(("wiki", "1 epoch", wiki_epochs[1]))
    lines = []
    for i, content in enumerate(placed):
        if not content:
            continue
        phases = list(dict.fromkeys(p for p, _, _ in content))
        configs = [c for p, c, _ in content if p == "bench"]
        what = ", ".join(f"{p}{' ' + c if c else ''} {s:.0f} s" for p, c, s in content)
        command = f"gpu_suite.py --out $OUT --budget-s {budget_s:g} --phases {','.join(phases)}"
        if configs and len(configs) < len(BENCH_CONFIGS):
            command += f" --bench-configs {','.join(configs)}"
        lines.append(f"  call {i + 1} ({sum(s for _, _, s in content):.0f} s): {what}\n      {command}")
    if missing:
        lines.append("  does not fit: " + ", ".join(f"{p}{' ' + c if c else ''} ({s:.0f} s)" for p, c, s in missing))
    return lines


def _manifest_for_plan(prepared: str) -> dict:
    """Steps per epoch and validation batches of the protocols, from the prepared data if
    it is here, else from the sizes of the full data sets (DESIGN.md, data README)."""
    try:
        manifest = read_manifest(prepared)
        ptb_train, ptb_valid = manifest["ptb"]["sentences"]["train"], manifest["ptb"]["sentences"]["valid"]
        wiki_train, wiki_valid = manifest["wiki"]["tokens"]["train"], manifest["wiki"]["tokens"]["valid"]
        source = f"from the prepared data in {prepared}"
    except FileNotFoundError:
        # what --prepare wrote for ../shared/data on 2026-12-07 (PTB; the stand-in at BPE-16k)
        ptb_train, ptb_valid, wiki_train, wiki_valid = 42_068, 3_370, 23_481_585, 766_431
        source = "the counts --prepare measured on the full data (no prepared data here)"
    return {"ptb_steps": ptb_train // 128, "ptb_valid": math.ceil(ptb_valid / 128),
            "wiki_steps": (wiki_train // 256) // 128, "wiki_valid": math.ceil(wiki_valid / 256 / 128),
            "source": source}


# --- prepare: the data the GPU machine reads ---


def prepare(args: argparse.Namespace, command: str) -> dict:
    """PTB's sentences and the wiki corpus's BPE ids into ``--prepared``, with a manifest
    (the commit it was built at, sizes); ``--tiny`` keeps a toy share of each."""
    folder = Path(args.prepared)
    started = time.monotonic()
    ptb = load_ptb(args.data_root, max_len=10**9)
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) if args.tiny else DEFAULT_CACHE  # a dry run writes nothing into the checkout
        vocab = args.vocab or (300 if args.tiny else 16000)
        wiki = load_wiki(args.data_root, vocab, cache, use_datasets=False,
                         max_train_chars=200_000 if args.tiny else None)
    if args.tiny:
        ptb.train, ptb.valid, ptb.test = ptb.train[:200], ptb.valid[:40], ptb.test[:40]
    manifest = write_prepared(folder, ptb, wiki, vocab, {**provenance.git_commit(), "command": command,
                                                          "tiny": args.tiny, "data_root": str(args.data_root)})
    print(f"prepared {folder} in {time.monotonic() - started:.0f} s: PTB {manifest['ptb']['sentences']} sentences, "
          f"wiki ({wiki.source}, BPE-{vocab}) {manifest['wiki']['tokens']} tokens, "
          f"{manifest['bytes'] / 2**20:.1f} MiB; commit {manifest['commit']}")
    if manifest["bytes"] > 60 * 2**20:
        print(f"warning: {manifest['bytes'] / 2**20:.1f} MiB is more than the 60 MiB a device call should carry")
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prepare", action="store_true", help="build the prepared data and stop")
    action.add_argument("--plan", action="store_true", help="print what fits in calls of --budget-s and stop")
    parser.add_argument("--out", help="where the phases' files and suite.json go (a GPU call's $OUT)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds this call may take (default 540)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, run in this order (default {','.join(PHASES)})")
    parser.add_argument("--methods", default=",".join(PROTOCOL_METHODS),
                        help=f"methods of the ptb and wiki phases (default {','.join(PROTOCOL_METHODS)})")
    parser.add_argument("--bench-configs", default=None,
                        help=f"comma-separated bench configs (default {','.join(BENCH_CONFIGS)})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the dry run of every phase on a CPU")
    parser.add_argument("--prepared", default=str(DEFAULT_PREPARED), help="the prepared data (default %(default)s)")
    parser.add_argument("--work", default=None, help="training runs' folders (default: a new temporary folder)")
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="--prepare: folder holding ptb/ and wiki/")
    parser.add_argument("--vocab", type=int, default=None, help="--prepare: wiki BPE size (16000; --tiny 300)")
    parser.add_argument("--plan-device", default=REFERENCE_DEVICE, help="--plan: the device to plan for")
    args = parser.parse_args(argv)
    args.phases = _listed(parser, args.phases, PHASES, "--phases")
    args.methods = _listed(parser, args.methods, None, "--methods")
    args.bench_configs = _listed(parser, args.bench_configs, BENCH_CONFIGS, "--bench-configs") \
        if args.bench_configs else None
    for method in args.methods:
        if method not in BENCH_ROW:
            parser.error(f"--methods: {method!r} has no bench row to estimate it by; expected some of "
                         f"{', '.join(BENCH_ROW)}")
    if not (args.prepare or args.plan):
        if not args.out:
            parser.error("--out is required to run the suite")
        if args.device == "cpu" and not args.tiny:
            parser.error("--device cpu runs only with --tiny: the protocols at full size need a GPU")
    if args.budget_s <= RESERVE_S:
        parser.error(f"--budget-s must be more than the {RESERVE_S:g} s kept back for writing results")
    return args


def _listed(parser: argparse.ArgumentParser, text: str, allowed, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        parser.error(f"{flag}: name at least one")
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; expected some of {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> dict | str:
    args = parse_args(argv)
    command = provenance.command_line(argv, __file__) if argv is not None else provenance.command_line()
    if args.prepare:
        return prepare(args, command)
    if args.plan:
        text = plan(args)
        print(text)
        return text
    summary = Suite(args, command).run()
    print(json.dumps({p["phase"]: p["status"] for p in summary["phases"]}))
    return summary


if __name__ == "__main__":
    run_script(main)
