"""Train a recurrent language model on the paper's protocols, with the training method
chosen only by ``dsf_compile.apply(model, mode=method)`` (DESIGN.md §5).

    python experiments/train.py --config ptb --method dsf --out experiments/runs/ptb-dsf
    python experiments/train.py --config wiki --method bptt --out experiments/runs/wiki-bptt
    python experiments/train.py --out experiments/runs/ptb-dsf --resume      # continue a run

Every protocol setting is a flag (``--width 128 --epochs 2 ...``).  Each run writes
``log.jsonl`` (train and validation records), ``summary.json`` and, for runs of at least
``--save-every`` steps (or when that flag is given), ``checkpoint.pt`` (model, optimiser,
scheduler, RNG states and data position; every ``--save-every`` steps, at each epoch's end
and where the run stops).  ``--resume`` continues an interrupted run to the same result it
would have reached uninterrupted.  Every departure from the protocol (a changed setting,
or a limit such as ``--max-steps``, ``--max-train-chars``, ``--valid-batches``, a
``--time-limit`` that stopped the run) is recorded in the summary, and the report prints
it beside the run's perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from data import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_ROOT,
    context_batches,
    load_prepared_ptb,
    load_prepared_wiki,
    load_ptb,
    load_wiki,
    run_script,
    sentence_batches,
)
from methods import EAGER_BPTT, label_of  # noqa: E402
from progress import Progress  # noqa: E402

import dsf_compile  # noqa: E402
from dsf_compile.models import RNNLanguageModel, TransformerLikeRNN  # noqa: E402
from dsf_compile.models.lm import masked_cross_entropy  # noqa: E402

# The two protocols of DESIGN.md §5.
CONFIGS = {
    "ptb": dict(
        data="ptb", model="stack", cell="gru", width=256, layers=3, context=64, batch=128, epochs=30,
        lr=1e-3, weight_decay=1e-4, schedule="step", milestones=[10, 20], warmup=0.0, floor=0.1, vocab=0,
    ),
    "wiki": dict(
        data="wiki", model="blocks", cell="gru", width=512, layers=3, context=256, batch=128, epochs=5,
        lr=1e-3, weight_decay=0.0, schedule="cosine", milestones=[], warmup=0.1, floor=0.1, vocab=16000,
    ),
}
# How a run is carried out; none of these changes what the protocol trains.
RUN_DEFAULTS = dict(
    method="dsf", feedback="linspace", iterations=1, momentum=0.9, window=1, target=0.99, auto_every=100,
    seed=0, compiler="inductor", device="auto",
    tf32=True, data_root=str(DEFAULT_ROOT), cache=str(DEFAULT_CACHE), prepared="", use_datasets=True,
    log_every=50, save_every=None, valid_every=0, fidelity_every=0,
)
# Limits that shorten the protocol whenever they are set (0: no limit); ``time_limit`` only
# departs from it when it stops the run.
RUN_LIMITS = dict(max_steps=0, max_train_chars=0, valid_batches=0, time_limit=0.0)
DEFAULT_SAVE_EVERY = 500
# flags restricted to a list of values
CHOICES = dict(method=(EAGER_BPTT, "bptt", "ft", "dsf", "highway", "tbptt", "auto"),
               feedback=("linspace", "uniform", "adaptive"), compiler=("inductor", "aot_eager"),
               device=("auto", "cpu", "cuda"), data=("ptb", "wiki"), model=("stack", "blocks"),
               cell=("gru", "lstm", "rnn", "gru-loop"), schedule=("step", "cosine"))
HELP = dict(
    data="corpus: Penn Treebank sentences, or WikiText-103 (its Wikipedia stand-in here) as BPE tokens",
    model="stack: recurrent layers with residual skips; blocks: transformer-like (LayerNorm, RNN, MLP)",
    cell="recurrent cell; gru-loop is a hand-written GRU stepped in a Python loop",
    width="hidden size = embedding width", layers="recurrent layers (blocks)",
    context="tokens per sequence (ptb: sentences are cut there)", batch="sequences per batch",
    epochs="passes over the training data", lr="Adam learning rate", weight_decay="Adam weight decay",
    schedule="step: ×0.1 at each milestone epoch; cosine: warm-up then cosine decay to floor × lr",
    milestones="epochs after which the step schedule divides the rate by 10",
    warmup="share of all steps spent warming up (cosine)", floor="final rate of the cosine schedule, × lr",
    vocab="BPE vocabulary size of the wiki corpus (0: ptb's own 10k words)",
    method=f"training method: {EAGER_BPTT} (the model as written, torch's fused RNN op, cuDNN on a GPU), or "
           "dsf_compile.apply(model, mode=method)",
    feedback="λ of mode dsf: the paper's linspace, uniform random, or adaptive (estimated in the backward)",
    iterations="Highway-BP refinements (method highway)",
    window="transitions each loss term backpropagates through (method tbptt)",
    target="gradient cosine to BPTT to reach with the fewest highway refinements (method auto)",
    auto_every="backward passes between method auto's measurements",
    momentum="smoothing of adaptive λ across steps (feedback adaptive)",
    seed="initialisation and batch order", compiler="what runs the rewritten graphs (aot_eager: no code generation)",
    device="auto: cuda when there is one", tf32="TensorFloat-32 matrix products on a GPU (the protocol's)",
    data_root="folder holding ptb/ and wiki/", cache="where the wiki tokenizer and token ids are cached",
    prepared="folder written by `gpu_suite.py --prepare`: token ids instead of the raw text (no tokenizer)",
    use_datasets="load WikiText-103 through `datasets` when it can be reached",
    log_every="steps between training log lines (and records in log.jsonl)",
    save_every=f"steps between checkpoints, also written at each epoch's end and where the run stops; "
               f"default {DEFAULT_SAVE_EVERY}, and none at all for a run planned shorter than that; 0: never",
    valid_every="steps between validations besides the one at each epoch's end (0: only there)",
    fidelity_every="every N steps, log the cosine of the method's gradient to exact BPTT's (0: never)",
    max_steps="stop after this many steps in all (0: no limit)",
    max_train_chars="read only this many characters of the wiki training text (0: all)",
    valid_batches="validate on only this many batches (0: the whole validation set)",
    time_limit="stop at the first step boundary after this many seconds of this process (0: no limit)",
)


def strict_bool(text: str) -> bool:
    """An argparse ``type`` for on/off flags that refuses what is neither."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (also 1/0, yes/no, on/off), got {text!r}")


def deviations(config: dict, stopped_by: str | None = None) -> dict:
    """Every setting of a run that departs from its protocol (DESIGN.md §5, TF32 included):
    the report writes these beside the run's perplexity, so no change goes unstated."""
    protocol = {**CONFIGS[config["config"]], "tf32": True}
    changed = {key: config[key] for key, value in protocol.items() if config[key] != value}
    limits = {key: config[key] for key in RUN_LIMITS if config[key] and key != "time_limit"}
    if stopped_by == "time_limit":
        limits["time_limit"] = config["time_limit"]
    return {**changed, **limits}


def _add_flag(group, key: str, value, help_text: str) -> None:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        group.add_argument(flag, type=strict_bool, default=None, metavar="BOOL", help=help_text)
    elif isinstance(value, list):
        group.add_argument(flag, type=int, nargs="*", default=None, help=help_text)
    elif value is None:  # save_every: an int whose default depends on the run
        group.add_argument(flag, type=int, default=None, help=help_text)
    else:
        group.add_argument(flag, type=type(value), default=None, choices=CHOICES.get(key), help=help_text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default=None, help="the protocol (default: ptb)")
    parser.add_argument("--out", required=True, help="run folder (log, checkpoint, summary)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    protocol = parser.add_argument_group("protocol settings (default: the --config's own)")
    for key, value in CONFIGS["ptb"].items():
        both = f"ptb: {CONFIGS['ptb'][key]!r}, wiki: {CONFIGS['wiki'][key]!r}"
        _add_flag(protocol, key, value, f"{HELP[key]} ({both})")
    run = parser.add_argument_group("how the run is carried out")
    for key, value in RUN_DEFAULTS.items():
        shown = "" if value is None or key == "save_every" else f" (default: {value!r})"
        _add_flag(run, key, value, HELP[key] + shown)
    limits = parser.add_argument_group("run limits: each shortens the protocol and is recorded as a departure")
    for key, value in RUN_LIMITS.items():
        _add_flag(limits, key, value, HELP[key])
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    name = args.config or "ptb"
    config = {"config": name, **CONFIGS[name], **RUN_DEFAULTS, **RUN_LIMITS}
    config.update({k: v for k, v in vars(args).items() if k in config and v is not None})
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["prepared"] and config["max_train_chars"]:
        raise SystemExit("--max-train-chars cuts the raw text; prepared data is token ids: drop one of the two")
    for key in ("save_every", "valid_every", "log_every", "fidelity_every", "max_steps", "max_train_chars",
                "valid_batches", "time_limit"):
        if config[key] is not None and config[key] < 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be 0 or more, got {config[key]}")
    if config["log_every"] == 0:
        raise SystemExit("--log-every must be at least 1")
    return config


class Data:
    """Training and validation batches of one protocol, in an order fixed by seed and epoch."""

    def __init__(self, config: dict) -> None:
        self.config = config
        prepared = config["prepared"]
        if config["data"] == "ptb":
            if prepared:
                corpus = load_prepared_ptb(prepared, max_len=config["context"])
            else:
                corpus = load_ptb(config["data_root"], max_len=config["context"])
            self.vocab_size, self.pad, self.corpus = len(corpus.vocab), corpus.pad, corpus
            self.source = "ptb"
        else:
            if prepared:
                corpus = load_prepared_wiki(prepared, config["vocab"])
            else:
                corpus = load_wiki(
                    config["data_root"], config["vocab"], config["cache"], config["use_datasets"],
                    config["max_train_chars"] or None,
                )
            self.vocab_size, self.pad, self.corpus = corpus.vocab_size, -100, corpus
            self.source = corpus.source

    def train(self, epoch: int) -> list:
        seed = self.config["seed"] * 1000 + epoch
        if self.config["data"] == "ptb":
            batches = sentence_batches(self.corpus.train, self.config["batch"], self.pad, shuffle=True, seed=seed)
            return [b for b in batches if len(b[0]) == self.config["batch"]]
        return list(context_batches(self.corpus.train, self.config["context"], self.config["batch"], True, seed))

    def valid(self):
        if self.config["data"] == "ptb":
            batches = sentence_batches(self.corpus.valid, self.config["batch"], self.pad, shuffle=False)
        else:
            batches = context_batches(self.corpus.valid, self.config["context"], self.config["batch"], False,
                                      drop_last=False)
        limit = self.config["valid_batches"]
        for i, batch in enumerate(batches):
            if limit and i >= limit:
                return
            yield batch


def build_model(config: dict, vocab_size: int) -> torch.nn.Module:
    if config["model"] == "stack":
        return RNNLanguageModel(vocab_size, config["width"], config["layers"], config["cell"])
    return TransformerLikeRNN(vocab_size, config["width"], config["layers"], config["cell"])


def lr_factor(config: dict, steps_per_epoch: int):
    total = steps_per_epoch * config["epochs"]

    def factor(step: int) -> float:
        if config["schedule"] == "step":
            epoch = step // steps_per_epoch
            return 0.1 ** sum(epoch >= m for m in config["milestones"])
        warmup = int(config["warmup"] * total)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return config["floor"] + (1 - config["floor"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def evaluate(model: torch.nn.Module, data: Data, device: str) -> float:
    """Validation perplexity.  Forward values are the same in every mode, so the model's
    own eager forward is used (no extra compilation for the no-grad graph)."""
    forward = type(model).forward.__get__(model)
    total, count = 0.0, 0
    print("validating ...", flush=True)
    with torch.no_grad():
        for x, y in data.valid():
            x, y = x.to(device), y.to(device)
            n = int((y != data.pad).sum())
            total += masked_cross_entropy(forward(x), y, data.pad).item() * n
            count += n
    return math.exp(total / count)


def method_options(config: dict) -> dict:
    """The apply() options the run's method reads (the others must not be passed)."""
    reads = {"highway": {"iterations": "iterations"}, "tbptt": {"window": "window"},
             "auto": {"target": "target", "every": "auto_every"}}.get(config["method"], {})
    options = {option: config[setting] for option, setting in reads.items()}
    if config["feedback"] == "adaptive":
        options["momentum"] = config["momentum"]
    return options


def method_label(config: dict) -> str:
    """The method as the report names it: dsf, dsf-adaptive, highway-k2, ..."""
    return label_of(config["method"], config["feedback"], config["iterations"], config["window"], config["target"])


def save_checkpoint(path: Path, **state) -> None:
    state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def limit_reached(config: dict, state: dict, run_start: float) -> str | None:
    """Which run limit stops the run before its next step, if any."""
    if config["max_steps"] and state["step"] >= config["max_steps"]:
        return "max_steps"
    if config["time_limit"] and time.perf_counter() - run_start >= config["time_limit"]:
        return "time_limit"
    return None


def logged_before(log_path: Path, step: int) -> list[dict]:
    """The entries of ``log_path`` written before a checkpoint at ``step``: training and
    validation records up to that step, fidelity probes before it (one at ``step`` is taken
    as the next step starts); a validation at a stop is not kept, since the run goes on."""
    if not log_path.is_file():
        return []
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [e for e in entries if (e["step"] < step if e["kind"] == "fidelity" else
                                   e["kind"] != "valid_at_stop" and e["step"] <= step)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = provenance.command_line(argv, __file__) if argv is not None else provenance.command_line()
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        config = {**RUN_DEFAULTS, **RUN_LIMITS, **checkpoint["config"]}
        # a resumed run may be given a later stopping point, nothing else: a changed
        # setting, logging included, would make it another run than the one it continues
        stopping = ("max_steps", "time_limit")
        changed = {key: value for key, value in vars(args).items()
                   if key in config and key not in stopping and value is not None and value != config[key]}
        if changed:
            raise SystemExit("--resume continues a run as it was started; it cannot change "
                             + ", ".join(f"--{k.replace('_', '-')} (the run has {config[k]!r})" for k in changed)
                             + ". Start another run with --out for other settings.")
        config.update({key: getattr(args, key) for key in stopping if getattr(args, key) is not None})
    else:
        if checkpoint_path.exists():
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
        config = resolve_config(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])
    device = config["device"]
    stamp = provenance.record(command, device)  # the code this process loaded, not what the tree holds at its end

    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    data = Data(config)  # before the run folder exists: a missing data file leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, data.vocab_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    steps_per_epoch = len(data.train(0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "best_valid_ppl": math.inf, "train_seconds": 0.0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])
        if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"resuming {out} at epoch {state['epoch']}, batch {state['batch']} (step {state['step']})")
    if config["method"] != EAGER_BPTT:
        dsf_compile.apply(model, config["method"], config["feedback"], seed=config["seed"],
                          compiler=config["compiler"], **method_options(config))
    log_path = out / "log.jsonl"
    # the log goes on from the checkpoint: what was logged after it (or by an attempt that
    # wrote none) is logged again by this run, so it is dropped rather than kept twice
    kept = logged_before(log_path, state["step"]) if checkpoint is not None else []
    log_path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    log = log_path.open("a")

    def record(**entry) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    total_steps = steps_per_epoch * config["epochs"]
    last_step = min(total_steps, config["max_steps"]) if config["max_steps"] else total_steps
    save_every = DEFAULT_SAVE_EVERY if config["save_every"] is None else config["save_every"]
    # a short run writes no checkpoint unless asked to (a 3×512 model's is 240 MB)
    saving = save_every > 0 and (config["save_every"] is not None or last_step >= save_every)

    def checkpoint_now() -> None:
        if saving:
            save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), state=state, config=config)

    label = method_label(config)
    of_protocol = f" (the protocol has {total_steps})" if last_step != total_steps else ""
    print(f"{config['config']} / {label}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{steps_per_epoch} steps per epoch, {config['epochs']} epochs, {last_step} steps to run{of_protocol}, "
          f"data {data.source}, device {device}", flush=True)
    progress = Progress(label, state["step"], last_step)

    def validate(epoch: float) -> float:
        valid = evaluate(model, data, device)
        state["best_valid_ppl"] = min(state["best_valid_ppl"], valid)
        progress.write(f"epoch {epoch:g}: valid ppl {valid:.2f} (best {state['best_valid_ppl']:.2f})")
        record(kind="valid", epoch=epoch, step=state["step"], tokens=state["tokens"], valid_ppl=valid)
        return valid

    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    run_start = time.perf_counter()
    stopped_by = None
    first_step = True
    while state["epoch"] < config["epochs"] and stopped_by is None:
        batches = data.train(state["epoch"])
        for x, y in batches[state["batch"] :]:
            stopped_by = limit_reached(config, state, run_start)
            if stopped_by:
                break
            x, y = x.to(device), y.to(device)
            if config["fidelity_every"] and state["step"] % config["fidelity_every"] == 0:
                fidelity = dsf_compile.gradient_fidelity(
                    model, lambda x=x, y=y: masked_cross_entropy(model(x), y, data.pad))
                record(kind="fidelity", step=state["step"], epoch=state["epoch"], tokens=state["tokens"],
                       cosine=fidelity.cosine, relative_error=fidelity.relative_error,
                       parameters={p.name: p.cosine for p in fidelity.parameters})
            if first_step and config["method"] != EAGER_BPTT:
                print("first step: compiling the rewritten graphs (seconds to minutes) ...", flush=True)
            first_step = False
            started = time.perf_counter()
            loss = masked_cross_entropy(model(x), y, data.pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            tokens = int((y != data.pad).sum())
            state["batch"] += 1
            state["step"] += 1
            state["tokens"] += tokens
            value = loss.item()
            state["train_seconds"] += time.perf_counter() - started
            window_loss += value * tokens
            window_tokens += tokens
            progress.step(state["step"])
            if state["step"] % config["log_every"] == 0 or state["step"] == 1:
                elapsed = time.perf_counter() - window_start
                mean = window_loss / window_tokens
                rate = window_tokens / elapsed
                progress.write(f"epoch {state['epoch'] + 1} step {state['step']}/{last_step}  loss {mean:.3f}  "
                               f"ppl {math.exp(mean):.1f}  {rate:,.0f} tok/s")
                record(kind="train", step=state["step"], epoch=state["epoch"], tokens=state["tokens"], loss=mean,
                       ppl=math.exp(mean), tokens_per_s=rate, lr=scheduler.get_last_lr()[0])
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if (config["valid_every"] and state["step"] % config["valid_every"] == 0
                    and state["batch"] < len(batches)):  # (the epoch's end validates anyway)
                validate(round(state["epoch"] + state["batch"] / len(batches), 4))
            if saving and state["step"] % save_every == 0:
                checkpoint_now()
        else:
            state["epoch"] += 1
            state["batch"] = 0
            validate(state["epoch"])
        checkpoint_now()
    progress.close()
    valid_at_stop = None
    if stopped_by:  # a run cut short still ends with a validation and a line saying so
        valid_at_stop = evaluate(model, data, device)
        flag = "--" + stopped_by.replace("_", "-")
        print(f"stopped by {flag} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']}): "
              f"valid ppl {valid_at_stop:.2f}" + ("; --resume continues it" if saving else ""), flush=True)
        record(kind="valid_at_stop", epoch=state["epoch"], step=state["step"], tokens=state["tokens"],
               valid_ppl=valid_at_stop)
    log.close()
    summary = {
        "config": config["config"], "method": label,
        "best_valid_ppl": state["best_valid_ppl"] if math.isfinite(state["best_valid_ppl"]) else None,
        "tokens": state["tokens"], "epochs": state["epoch"], "steps": state["step"], "complete": not stopped_by,
        "stopped_by": stopped_by, "valid_ppl_at_stop": valid_at_stop,
        "data": data.source, "width": config["width"], "layers": config["layers"], "cell": config["cell"],
        "train_seconds": state["train_seconds"], "device": device,
        "deviations": deviations(config, stopped_by), "settings": config,
        "provenance": stamp,
        # what each loop's backward ran, as report() says it (auto: the k it chose and why)
        "loops": [] if config["method"] == EAGER_BPTT else [
            {"name": loop.name, "rewrite": loop.rewrite, "feedback": loop.feedback}
            for loop in dsf_compile.report(model).loops],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    run_script(main)
