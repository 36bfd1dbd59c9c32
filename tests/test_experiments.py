"""The experiment scripts on tiny synthetic data: protocols end to end, resume, report."""

import json
import lzma
import random
import sys
from pathlib import Path

import pytest
import torch

import dsf_compile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import report  # noqa: E402
import train  # noqa: E402

WORDS = "the a of to and in that is was he for it with as his on be at by i this had not are but from".split()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A PTB-format folder and a Wikipedia-stand-in-format folder of random sentences."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def sentences(n):
        return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)) + "\n"

    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.train.txt").write_text(sentences(120) + "<unk> N\n")
    (root / "ptb" / "ptb.valid.txt").write_text(sentences(20))
    (root / "ptb" / "ptb.test.txt").write_text(sentences(20))
    (root / "wiki").mkdir()
    with lzma.open(root / "wiki" / "train.txt.xz", "wt") as f:
        f.write(sentences(300))
    (root / "wiki" / "valid.txt").write_text(sentences(30))
    (root / "wiki" / "test.txt").write_text(sentences(30))
    return root


TINY_PTB = ["--config", "ptb", "--width", "8", "--layers", "2", "--batch", "8", "--epochs", "2",
            "--milestones", "1", "--compiler", "aot_eager", "--log-every", "5", "--save-every", "1000"]


def _run(data_root, out, *extra):
    return train.main([*TINY_PTB, "--data-root", str(data_root), "--out", str(out), *extra])


def test_resume_continues_to_identical_results(data_root, tmp_path):
    whole = _run(data_root, tmp_path / "whole")
    steps_per_epoch = whole["steps"] // 2
    interrupted = _run(data_root, tmp_path / "split", "--max-steps", str(steps_per_epoch + 3))
    assert not interrupted["complete"] and interrupted["steps"] == steps_per_epoch + 3
    resumed = train.main(["--out", str(tmp_path / "split"), "--resume", "--max-steps", "0"])
    assert resumed["complete"] and resumed["steps"] == whole["steps"]
    assert resumed["best_valid_ppl"] == whole["best_valid_ppl"]
    assert interrupted["deviations"]["max_steps"] == steps_per_epoch + 3
    assert resumed["deviations"] == whole["deviations"] and "max_steps" not in whole["deviations"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    valid = lambda run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").open() if '"valid"' in line]
    assert [v["valid_ppl"] for v in valid("whole")] == [v["valid_ppl"] for v in valid("split")]
    # the resumed run's log is the whole run's, each step once, the validation at the stop dropped
    assert _log_steps(tmp_path / "split") == _log_steps(tmp_path / "whole")
    # started over without a checkpoint: the earlier attempt's records are gone
    (tmp_path / "split" / "checkpoint.pt").unlink()
    _run(data_root, tmp_path / "split")
    assert _log_steps(tmp_path / "split") == _log_steps(tmp_path / "whole")


def _log_steps(run: Path) -> list[tuple]:
    return [(e["kind"], e["step"], e["tokens"]) for e in map(json.loads, (run / "log.jsonl").open())]


def test_report_reads_a_log_of_several_attempts_as_its_last_one():
    def train_entry(step):
        return {"kind": "train", "step": step, "tokens": 10 * step, "ppl": 100.0 - step}

    started_over = [train_entry(1), train_entry(5), {"kind": "valid", "step": 5, "tokens": 50, "epoch": 0.5,
                                                     "valid_ppl": 9.0}, train_entry(10), train_entry(1),
                    train_entry(5)]
    assert report.latest_attempt(started_over) == [train_entry(1), train_entry(5)]
    resumed = [train_entry(5), train_entry(10), train_entry(15), train_entry(10), train_entry(15)]
    assert report.latest_attempt(resumed) == [train_entry(5), train_entry(10), train_entry(15)]


def test_refuses_to_overwrite_a_run(data_root, tmp_path):
    _run(data_root, tmp_path / "run", "--max-steps", "1")
    with pytest.raises(SystemExit, match="--resume"):
        _run(data_root, tmp_path / "run")


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ptb.train.txt.*--data-root"):
        train.main([*TINY_PTB, "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


def test_resume_refuses_changed_settings_and_a_stopped_run_ends_validated(data_root, tmp_path, capsys):
    stopped = _run(data_root, tmp_path / "run", "--max-steps", "2")
    assert not stopped["complete"] and stopped["valid_ppl_at_stop"] > 1
    assert "stopped by --max-steps at step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot change --log-every"):
        train.main(["--out", str(tmp_path / "run"), "--resume", "--log-every", "1"])
    with pytest.raises(SystemExit, match="cannot change --config"):
        train.main(["--out", str(tmp_path / "run"), "--resume", "--config", "wiki"])


def test_tiny_wiki_protocol_and_report(data_root, tmp_path):
    runs = []
    for method in ("bptt", "ft", "dsf"):
        summary = train.main([
            "--config", "wiki", "--method", method, "--data-root", str(data_root), "--use-datasets", "false",
            "--cache", str(tmp_path / "cache"), "--vocab", "300", "--context", "16", "--width", "16",
            "--layers", "1", "--batch", "4", "--epochs", "1", "--compiler", "aot_eager",
            "--valid-batches", "3", "--out", str(tmp_path / f"wiki-{method}"),
        ])
        assert summary["complete"] and summary["data"] == "wikipedia-stand-in"
        assert summary["deviations"] == {"vocab": 300, "context": 16, "width": 16, "layers": 1, "batch": 4,
                                         "epochs": 1, "valid_batches": 3}
        assert 1 < summary["best_valid_ppl"] < 300
        runs.append(tmp_path / f"wiki-{method}")
    assert len(list((tmp_path / "cache").glob("bpe-300-*.json"))) == 1
    table = report.main(["--runs", *map(str, runs), "--name", "wiki", "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "wiki.json").read_text())
    ppl = {r["method"]: r["best_valid_ppl"] for r in results["runs"]}
    assert set(ppl) == {"bptt", "ft", "dsf"}
    closure = (ppl["ft"] - ppl["dsf"]) / (ppl["ft"] - ppl["bptt"])
    assert f"{100 * closure:.0f}%" in table
    assert "valid_batches=3" in table and "context=16" in table  # deviations are written in the table
    assert (tmp_path / "results" / "wiki-curves.png").stat().st_size > 1000


def test_wiki_token_cache_is_compact_and_decodes_to_the_text(data_root, tmp_path):
    import data

    corpus = data.load_wiki(data_root, 300, tmp_path / "cache", use_datasets=False)
    cached = sorted((tmp_path / "cache").glob("valid-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0]).dtype == torch.int16
    again = data.load_wiki(data_root, 300, tmp_path / "cache", use_datasets=False)
    assert torch.equal(again.valid, corpus.valid) and torch.equal(again.train, corpus.train)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(next((tmp_path / "cache").glob("bpe-300-*.json"))))
    eos = tokenizer.token_to_id(data.EOS)
    lines, line = [], []
    for token in corpus.valid.tolist():
        if token == eos:
            lines.append(tokenizer.decode(line))
            line = []
        else:
            line.append(token)
    assert lines == (data_root / "wiki" / "valid.txt").read_text().splitlines()


def test_benchmark_small_runs_every_row_and_resumes(tmp_path):
    import bench

    out = str(tmp_path / "bench")
    common = ["--small", "--configs", "ptb", "--steps", "2", "--rounds", "2", "--warmup", "0", "--out", out]
    first = bench.main([*common, "--methods", "eager-bptt", "dsf-dsf"])
    # each model family's own eager baseline, for its speed-ups
    assert [(r["model"], r["method"]) for r in first["rows"]] == [
        ("nn.GRU", "eager-bptt"), ("nn.GRU", "dsf-dsf"), ("cell", "eager-bptt"), ("cell", "dsf-dsf")]
    kept = first["rows"][0]["step_ms"]
    result = bench.main([*common, "--resume"])
    methods = [(r["model"], r["method"]) for r in result["rows"]]
    assert sorted(methods) == sorted([("nn.GRU", m) for m in bench.GRU_METHODS] +
                                     [("cell", m) for m in bench.CELL_METHODS])
    assert result["rows"][0]["step_ms"] == kept  # measured once, kept on resume
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and 0 < row["backward_share"] < 1
        assert row["rounds"] == 2 and row["step_ms_min_round"] <= row["step_ms"] <= row["step_ms_max_round"]
        if row["method"].startswith("dsf-"):
            assert row["loops"] == 2  # the rewrite really happened in the timed model
    assert [s["implementation"] for s in result["scan"]] == ["dsf (default)"] * 2
    assert all(s["scan_ms"] > 0 and s["floor_ms"] > 0 for s in result["scan"])
    table = (tmp_path / "bench.md").read_text()
    assert "dsf-dsf" in table and "speed-up" in table


def test_benchmark_gives_up_a_first_step_past_the_time_limit(tmp_path):
    import bench

    result = bench.main(["--small", "--configs", "ptb", "--methods", "compile-bptt", "--compile-timeout", "0.5",
                         "--no-scan", "--out", str(tmp_path / "bench")])
    (cell,) = [row for row in result["rows"] if row["model"] == "cell"]  # Inductor codegen: seconds at least
    assert cell["first_step_s"] is None and "not finished in 0.5 s" in cell["status"] and "step_ms" not in cell


def test_profile_step_writes_a_table_per_method(tmp_path):
    import profile_step

    text = profile_step.main(["--small", "--config", "ptb", "--methods", "eager-bptt", "dsf-dsf", "--steps", "1",
                              "--top", "5", "--out", str(tmp_path / "profile")])
    assert (tmp_path / "profile.md").read_text() == text
    assert text.count("## ptb nn.GRU ") == 2 and "step " in text and "Name" in text
    with pytest.raises(SystemExit):
        profile_step.main(["--small", "--model", "cell", "--methods", "dsf-ft"])  # not a cell row


def test_highway_and_adaptive_runs_log_fidelity_and_the_report_plots_it(data_root, tmp_path):
    runs = []
    for extra in (["--method", "highway", "--iterations", "1"], ["--method", "dsf", "--feedback", "adaptive"]):
        summary = _run(data_root, tmp_path / extra[-1], "--epochs", "1", "--fidelity-every", "4", *extra)
        assert summary["complete"]
        log = [json.loads(line) for line in (tmp_path / extra[-1] / "log.jsonl").open()]
        fidelity = [e for e in log if e["kind"] == "fidelity"]
        assert [e["step"] for e in fidelity] == list(range(0, summary["steps"], 4))
        assert all(0 < e["cosine"] <= 1 + 1e-9 and e["parameters"]["head.weight"] > 0.999 for e in fidelity)
        runs.append(tmp_path / extra[-1])
    assert [json.loads((r / "summary.json").read_text())["method"] for r in runs] == ["highway-k1", "dsf-adaptive"]
    table = report.main(["--runs", *map(str, runs), "--name", "modes", "--out", str(tmp_path / "results")])
    assert "highway-k1" in table and "dsf-adaptive" in table and "modes-fidelity.png" in table
    (tmp_path / "unfinished").mkdir()
    table = report.main(["--runs", *map(str, runs), str(tmp_path / "unfinished"), "--name", "modes",
                         "--out", str(tmp_path / "results")])
    assert "unfinished: no summary.json" in table
    assert (tmp_path / "results" / "modes-fidelity.png").stat().st_size > 1000


@pytest.mark.parametrize("flag,value", [("--method", "stak"), ("--feedback", "linspac"), ("--compiler", "x")])
def test_a_choice_flag_out_of_its_choices_is_refused(data_root, tmp_path, flag, value):
    with pytest.raises(SystemExit):
        _run(data_root, tmp_path / "run", flag, value)
    assert not (tmp_path / "run").exists()


def test_fidelity_experiment_writes_its_table(data_root, tmp_path):
    import fidelity

    result = fidelity.main(["--data-root", str(data_root), "--out", str(tmp_path / "fid"), "--width", "8",
                            "--context", "8", "--batch", "2", "--steps", "2", "--every", "1",
                            "--methods", "ft", "highway-k0", "highway-k4"])
    assert [r["step"] for r in result["records"]] == [0, 1, 2]
    for record in result["records"]:
        # T = 8: four iterations leave the first three steps approximate, FT is further off
        assert record["methods"]["highway-k4"]["recurrent_cosine"] > record["methods"]["ft"]["recurrent_cosine"]
        assert all(-1 <= m["recurrent_cosine"] <= 1 + 1e-9 for m in record["methods"].values())
    assert "highway-k4" in (tmp_path / "fid.md").read_text() and (tmp_path / "fid.png").stat().st_size > 1000
    # redrawn from its JSON, without training: the same table, a figure, no second JSON
    fidelity.main(["--from-json", str(tmp_path / "fid.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == (tmp_path / "fid.md").read_text()
    assert (tmp_path / "again.png").stat().st_size > 1000 and not (tmp_path / "again.json").exists()


def test_benchmark_times_the_extra_backward_rewrites_when_named(tmp_path):
    import bench

    result = bench.main(["--small", "--configs", "cpu", "--steps", "1", "--rounds", "1", "--warmup", "0",
                         "--no-scan", "--methods", "dsf-highway1", "--out", str(tmp_path / "bench")])
    (row,) = result["rows"]  # named, so timed; only for nn.GRU
    assert (row["model"], row["method"]) == ("nn.GRU", "dsf-highway1")
    assert row["step_ms"] > 0 and row["loops"] == 2
    assert bench.APPLY_OPTIONS["dsf-highway1"] == {"mode": "highway", "iterations": 1}


def test_quickstart_compares_methods_on_the_same_steps(data_root, tmp_path):
    import quickstart

    rows = quickstart.main(["--data-root", str(data_root), "--steps", "3", "--hidden", "8", "--layers", "1",
                            "--context", "16", "--batch", "2", "--valid-batches", "1", "--compiler", "aot_eager",
                            "--methods", "eager-bptt", "bptt", "highway-k1", "--out", str(tmp_path / "q.json")])
    by = {r["method"]: r for r in rows}
    assert by["eager-bptt"]["speed-up vs eager BPTT"] == 1.0
    # the same model, batches and steps, so exact mode trains to the same perplexity as eager
    assert by["bptt"]["valid ppl"] == pytest.approx(by["eager-bptt"]["valid ppl"], rel=1e-4)
    assert by["bptt"]["grad cosine to BPTT"] == pytest.approx(1, abs=1e-6)
    assert 0 < by["highway-k1"]["grad cosine to BPTT"] <= 1 + 1e-6 and by["highway-k1"]["loops rewritten"] == 1
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == rows


def test_quickstart_explains_its_table_and_says_the_machines_load(data_root, tmp_path, capsys, monkeypatch):
    import quickstart

    monkeypatch.setattr(quickstart.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    quickstart.main(["--data-root", str(data_root), "--steps", "2", "--hidden", "8", "--layers", "1",
                     "--context", "16", "--batch", "2", "--valid-batches", "1", "--compiler", "aot_eager",
                     "--methods", "eager-bptt", "ft"])
    out = capsys.readouterr().out
    assert "training characters" in out and "ft: fully truncated BPTT" in out and "grad cosine to BPTT: the" in out
    assert "ft: first step, compiling" in out and "ft: validating" in out
    assert "Machine load (1-minute average) 9.00 on" in out and "WARNING: more than its cores" in out


def test_gap_closure_is_not_a_number_when_ft_is_not_behind_bptt():
    assert report.gap_closure({"bptt": 100.0, "ft": 120.0, "dsf": 105.0}) == pytest.approx(0.75)
    assert report.gap_closure({"bptt": 100.0, "ft": 95.0, "dsf": 105.0}) is None
    assert report.describe_closure({"bptt": 100.0, "ft": 95.0, "dsf": 105.0}) == "none: FT not behind BPTT"


def test_sweep_runs_its_grid_resumes_and_reports(data_root, tmp_path):
    import sweep

    spec = {"name": "tiny", "base": {"config": "ptb", "width": 8, "batch": 8, "epochs": 1, "compiler": "aot_eager",
                                     "log_every": 5, "save_every": 1000, "data_root": str(data_root)},
            "grid": {"method": ["bptt", "highway-k1"], "layers": [1, 2]}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    runs = tmp_path / "runs"
    # one run interrupted (killed after its checkpoint: no summary), to be resumed by the sweep
    interrupted = runs / "tiny" / "bptt-layers2"
    train.main([*sweep.flags_of({**spec["base"], "method": "bptt", "layers": 2}), "--out", str(interrupted),
                "--max-steps", "2"])
    (interrupted / "summary.json").unlink()
    assert sweep.status(interrupted, 0) == "resume"
    finished = sweep.main([str(path), "--runs", str(runs)])
    assert sorted(f.name for f in finished) == ["bptt-layers1", "bptt-layers2", "highway-k1-layers1",
                                               "highway-k1-layers2"]
    summaries = {f.name: json.loads((f / "summary.json").read_text()) for f in finished}
    assert all(s["complete"] for s in summaries.values())
    assert summaries["highway-k1-layers2"]["method"] == "highway-k1" and summaries["bptt-layers2"]["layers"] == 2
    assert summaries["bptt-layers2"]["tokens"] == summaries["bptt-layers1"]["tokens"]  # the same budget
    table = (runs / "tiny" / "tiny.md").read_text()
    assert "highway-k1" in table and "ptb 2×8 gru" in table
    before = (runs / "tiny" / "bptt-layers1" / "summary.json").stat().st_mtime_ns
    sweep.main([str(path), "--runs", str(runs)])  # everything done: nothing trains again
    assert (runs / "tiny" / "bptt-layers1" / "summary.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("spec,message", [
    ({"name": "x", "grid": {"method": ["dsff"]}}, "method 'dsff'"),
    ({"name": "x", "grid": {"depth": [1]}}, "grid.depth is not a train.py setting"),
    ({"name": "x", "base": {"max_steps": 5}, "grid": {"max_steps": [1]}}, "set it in 'base'"),
    ({"grid": {}}, "'name', 'grid'"),
])
def test_a_bad_sweep_file_is_refused_before_anything_runs(tmp_path, spec, message):
    import sweep

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match=message):
        sweep.main([str(path), "--runs", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_the_committed_sweeps_are_valid():
    import sweep

    for path in sorted((Path(__file__).resolve().parent.parent / "experiments" / "sweeps").glob("*.json")):
        assert sweep.runs_of(sweep.load_sweep(path)), path


def test_every_figure_gives_a_method_the_same_colour_and_smooths_without_lag():
    import plots

    assert plots.colour("dsf") == plots.colour("dsf-linspace") != plots.colour("ft")
    assert plots.colour("highway-k7") == plots.colour("highway-k7")  # a spare, but always the same
    falling = [1100.0 - 3 * i for i in range(200)]  # a short run's loss, still falling
    assert plots.smoothed(falling) == pytest.approx(falling)  # a centred window: no lag, even at the ends
    noisy = [50 + (-1) ** i * 10 for i in range(200)]
    inner = plots.smoothed(noisy)[20:-20]
    assert max(inner) - min(inner) < 2 and plots.smoothed(noisy)[-1] == noisy[-1]


@pytest.mark.parametrize("label", ["bptt", "ft", "dsf", "dsf-uniform", "dsf-adaptive", "highway-k0", "highway-k12"])
def test_a_method_label_names_its_apply_options_and_back(label):
    import methods

    options = methods.apply_options(label)
    assert methods.label_of(**options) == label
    dsf_compile.apply(torch.nn.GRU(2, 3), compiler="aot_eager", **options)  # options apply accepts


def test_an_unknown_method_label_is_refused():
    import methods

    with pytest.raises(ValueError, match="method 'highway-2'"):
        methods.apply_options("highway-2")


def test_a_time_limit_stops_the_run_validated_and_recorded(data_root, tmp_path):
    summary = _run(data_root, tmp_path / "run", "--time-limit", "1e-9")
    assert summary["stopped_by"] == "time_limit" and not summary["complete"] and summary["steps"] == 0
    assert summary["deviations"]["time_limit"] == 1e-9 and summary["valid_ppl_at_stop"] > 1
    unhit = _run(data_root, tmp_path / "unhit", "--time-limit", "3600", "--epochs", "1")
    assert unhit["complete"] and "time_limit" not in unhit["deviations"]  # set but not reached: no departure


def test_validation_several_times_an_epoch_and_the_summary_records_provenance(data_root, tmp_path):
    summary = _run(data_root, tmp_path / "run", "--epochs", "1", "--valid-every", "4")
    valid = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open() if '"valid"' in line]
    steps = summary["steps"]
    assert [v["step"] for v in valid] == [*range(4, steps, 4), steps]
    assert [v["epoch"] for v in valid[:-1]] == [round(v["step"] / steps, 4) for v in valid[:-1]]
    assert valid[-1]["epoch"] == 1
    assert summary["best_valid_ppl"] == min(v["valid_ppl"] for v in valid)
    stamp = summary["provenance"]
    assert stamp["commit"] and stamp["torch"] == torch.__version__ and stamp["device"].startswith("cpu")
    assert stamp["command"].startswith("python experiments/train.py --config ptb")


def test_on_off_flags_refuse_what_is_neither(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(data_root, tmp_path / "run", "--tf32", "maybe")
    assert "expected true or false" in capsys.readouterr().err
    assert train.strict_bool("Off") is False and train.strict_bool("yes") is True


def test_a_short_run_writes_no_checkpoint_unless_asked(data_root, tmp_path, capsys):
    short = [*TINY_PTB[: TINY_PTB.index("--save-every")], "--data-root", str(data_root), "--max-steps", "3"]
    train.main([*short, "--out", str(tmp_path / "short")])
    assert not (tmp_path / "short" / "checkpoint.pt").exists()
    assert "--resume continues it" not in capsys.readouterr().out  # nothing to resume from
    train.main([*short, "--out", str(tmp_path / "asked"), "--save-every", "2"])
    assert (tmp_path / "asked" / "checkpoint.pt").exists() and "--resume continues it" in capsys.readouterr().out
    train.main([*short, "--out", str(tmp_path / "never"), "--save-every", "0", "--max-steps", "0"])
    assert not (tmp_path / "never" / "checkpoint.pt").exists()


def test_progress_lines_when_the_output_is_not_a_terminal(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.Progress, "PLAIN_EVERY_S", 0.0)
    summary = _run(data_root, tmp_path / "run", "--epochs", "1", "--log-every", "1000")
    out = capsys.readouterr().out
    steps = summary["steps"]
    # no bar (captured output is not a TTY): a plain line after every step, at this interval
    assert sum(f"bptt: step {i}/{steps}," in out or f"dsf: step {i}/{steps}," in out for i in range(2, steps + 1)) \
        == steps - 1
    assert "steps/s, about" in out and "first step: compiling" in out and "validating ..." in out


def test_eager_bptt_trains_the_model_as_written_and_prepared_data_trains_alike(data_root, tmp_path):
    import gpu_suite

    gpu_suite.main(["--prepare", "--tiny", "--data-root", str(data_root), "--prepared", str(tmp_path / "prep")])
    from_text = _run(data_root, tmp_path / "text", "--method", "eager-bptt", "--epochs", "1")
    from_ids = _run(data_root, tmp_path / "ids", "--method", "eager-bptt", "--epochs", "1",
                    "--prepared", str(tmp_path / "prep"))
    assert from_text["method"] == "eager-bptt" and from_text["best_valid_ppl"] == from_ids["best_valid_ppl"]
    applied = _run(data_root, tmp_path / "applied", "--method", "bptt", "--epochs", "1")
    assert applied["best_valid_ppl"] == pytest.approx(from_text["best_valid_ppl"], rel=1e-5)  # both exact


def test_report_uses_the_validation_at_a_stop_and_draws_no_empty_figure(data_root, tmp_path):
    _run(data_root, tmp_path / "stopped", "--max-steps", "2", "--log-every", "1")
    text = report.main(["--runs", str(tmp_path / "stopped"), "--name", "r", "--out", str(tmp_path / "out")])
    assert "validation at its stop (step 2" in text and (tmp_path / "out" / "r-curves.png").is_file()
    document = json.loads((tmp_path / "out" / "r.json").read_text())
    document["runs"][0]["curves"] = {"train": [], "valid": [], "fidelity": []}
    (tmp_path / "bare.json").write_text(json.dumps(document))
    text = report.main(["--from-json", str(tmp_path / "bare.json"), "--out", str(tmp_path / "bare")])
    assert "No curves" in text and not (tmp_path / "bare" / "bare-curves.png").exists()
    assert "no validation was logged" in text
    assert report.DEFAULT_OUT.relative_to(Path(report.__file__).resolve().parent / "runs")  # never results/
