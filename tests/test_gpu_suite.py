"""The GPU suite's dry run: every phase at toy sizes on a CPU, from prepared data to
``suite.json``, so that the command a GPU window runs cannot fail on a typo, a missing file
or a wrong path; its budget, its plan and its prepared data on their own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_experiments import data_root  # noqa: F401  (the synthetic PTB and wiki folders)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

import data  # noqa: E402
import gpu_suite  # noqa: E402
import provenance  # noqa: E402

PROVENANCE = ("commit", "torch", "device", "command")


@pytest.fixture(scope="module")
def prepared(data_root, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("prepared")
    gpu_suite.main(["--prepare", "--tiny", "--data-root", str(data_root), "--prepared", str(folder)])
    return folder


def _checkout_state() -> set[str]:
    """What git sees changed or added in the checkout, Python's byte-code caches aside."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                            capture_output=True, text=True).stdout.splitlines()
    return {line for line in status if "__pycache__" not in line and ".venv" not in line}


def test_prepared_data_is_what_the_loaders_read_from_the_text(data_root, prepared):  # noqa: F811
    manifest = data.read_manifest(prepared)
    assert manifest["commit"] == provenance.git_commit()["commit"] and manifest["bytes"] > 0
    for max_len in (5, 64):
        ptb, again = data.load_ptb(data_root, max_len=max_len), data.load_prepared_ptb(prepared, max_len=max_len)
        assert again.vocab == ptb.vocab and again.train == ptb.train and again.valid == ptb.valid
    wiki = data.load_prepared_wiki(prepared, 300)
    assert wiki.train.dtype == torch.int16 and wiki.vocab_size == manifest["wiki"]["vocab_size"]
    assert len(wiki.valid) == manifest["wiki"]["tokens"]["valid"] > 0
    with pytest.raises(data.DataMissing, match="pass --vocab 300"):
        data.load_prepared_wiki(prepared, 16000)
    with pytest.raises(data.DataMissing, match="--prepare"):
        data.read_manifest(prepared / "nowhere")


def test_dry_run_writes_every_phase_and_nothing_into_the_checkout(prepared, tmp_path):
    before = _checkout_state()
    out = tmp_path / "out"
    summary = gpu_suite.main(["--out", str(out), "--device", "cpu", "--tiny", "--prepared", str(prepared),
                              "--budget-s", "1500", "--work", str(tmp_path / "work")])
    assert _checkout_state() == before
    statuses = {p["phase"]: p["status"] for p in summary["phases"]}
    assert statuses == dict.fromkeys(gpu_suite.PHASES, "done"), summary
    suite = json.loads((out / "suite.json").read_text())
    assert suite["commit"] == provenance.git_commit()["commit"] and suite["device"].startswith("cpu-")
    listed = {f for p in suite["phases"] for f in p["files"]}
    assert listed == {p.name for p in out.iterdir()} - {"suite.json"}
    for name in listed:
        if name.endswith(".json"):
            document = json.loads((out / name).read_text())
            stamp = document.get("report", document)  # a report's provenance is its own
            assert all(stamp.get(k) for k in PROVENANCE), (name, stamp)
    tests = json.loads((out / "tests.json").read_text())
    assert tests["passed"] > 0 and tests["failed"] == 0 and not tests["timed_out"]
    bench = json.loads((out / next(f for f in listed if f.startswith("bench-") and f.endswith(".json"))).read_text())
    timed = {(r["model"], r["method"]) for r in bench["rows"] if r.get("step_ms")}
    assert timed == {("nn.GRU", m) for m in gpu_suite.BENCH_METHODS} | {("cell", "eager-bptt"), ("cell", "dsf-dsf")}
    assert all(r["commit"] == suite["commit"] for r in bench["rows"]) and bench["scan"]
    for phase, epochs in (("ptb", 2), ("wiki", 2)):
        report = json.loads((out / f"{phase}.json").read_text())
        runs = {r["method"]: r for r in report["runs"]}
        assert set(runs) == set(gpu_suite.PROTOCOL_METHODS)
        assert all(r["complete"] and r["epochs"] == epochs and r["curves"]["valid"] for r in runs.values())
        assert (out / f"{phase}-curves.png").stat().st_size > 1000
    wiki_valid = json.loads((out / "wiki.json").read_text())["runs"][0]["curves"]["valid"]
    assert len(wiki_valid) > 2 * 2  # several validations an epoch
    assert next(p for p in suite["phases"] if p["phase"] == "wiki")["epochs"] == 2


def test_a_budget_too_small_skips_every_phase_with_its_reason(prepared, tmp_path):
    summary = gpu_suite.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--prepared", str(prepared),
                              "--budget-s", "25", "--work", str(tmp_path / "work")])
    for phase in summary["phases"]:
        assert phase["status"] == "skipped", phase
        assert "s are left of the budget" in phase["reason"] and "needs about" in phase["reason"]
    assert json.loads((tmp_path / "suite.json").read_text())["phases"] == summary["phases"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.json", "work"]


def test_the_plan_for_an_h100_packs_the_phases_into_calls(tmp_path):
    text = gpu_suite.main(["--plan", "--prepared", str(tmp_path / "none")])
    assert text.startswith("Plan for NVIDIA H100 80GB HBM3: estimates from bench-NVIDIA-H100-80GB-HBM3.json")
    for phase in ("tests", "bench ptb", "bench wt103", "bench long", "ptb", "wiki"):
        assert f"\n  {phase} " in text, phase
    # eager BPTT's 30 PTB epochs at the committed bench's cuDNN step: start-up, first step,
    # 328 steps an epoch, 30 validations of 27 batches at a third of a step each
    bench = json.loads((REPO / "experiments" / "results" / "bench-NVIDIA-H100-80GB-HBM3.json").read_text())
    (row,) = [r for r in bench["rows"] if (r["config"], r["model"], r["method"]) == ("ptb", "nn.GRU", "cudnn-bptt")]
    want = gpu_suite.GPU.startup_s + row["first_step_s"] + (30 * 328 + 30 * 27 / 3) * row["step_ms"] / 1e3
    assert f"eager-bptt {want:.0f}," in text
    sections = {part.split(" call")[0]: part for part in text.split("\n\n") if " call" in part.split("\n")[0]}
    one, two = sections["1"], sections["2"]
    every = next(part for key, part in sections.items() if key.startswith("Every phase: "))
    calls_for_every = int(every.removeprefix("Every phase: ").split()[0])
    for calls, plan in ((1, one), (2, two), (calls_for_every, every)):
        commands = [line.strip() for line in plan.splitlines() if "gpu_suite.py --out $OUT" in line]
        assert 1 <= len(commands) <= calls
        for command in commands:  # each one the suite accepts
            gpu_suite.parse_args(command.split()[1:])
    assert "does not fit" in one  # everything together is far more than one call
    assert "does not fit" not in every and "--phases wiki" in every


def test_commit_without_git_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a git checkout
    monkeypatch.setenv("DSF_COMMIT", "abc123")
    monkeypatch.setenv("DSF_COMMIT_DIRTY", "0")
    assert provenance.git_commit() == {"commit": "abc123", "dirty": False, "commit_source": "DSF_COMMIT"}
    monkeypatch.delenv("DSF_COMMIT")
    assert provenance.git_commit()["commit"] is None


@pytest.mark.parametrize("argv,message", [
    (["--out", "x", "--phases", "tests,bnch"], "unknown bnch"),
    (["--out", "x", "--methods", "eager-bptt,dsf-uniform"], "no bench row"),
    (["--out", "x", "--device", "cpu"], "only with --tiny"),
    (["--phases", "tests"], "--out is required"),
    (["--out", "x", "--budget-s", "10"], "more than the 20 s"),
])
def test_bad_options_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(argv)
    assert message in capsys.readouterr().err
