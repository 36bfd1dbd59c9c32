"""Train a recurrent language model on the paper's protocols, with the training method
chosen only by ``dsf_compile.apply(model, mode=method)`` (DESIGN.md §5).

    python experiments/train.py --config ptb --method dsf --out experiments/runs/ptb-dsf
    python experiments/train.py --config wiki --method bptt --out experiments/runs/wiki-bptt
    python experiments/train.py --out experiments/runs/ptb-dsf --resume      # continue a run

Every protocol setting is a flag (``--width 128 --epochs 2 ...``).  Each run writes
``log.jsonl`` (train and validation records), ``checkpoint.pt`` (model, optimiser,
scheduler, RNG states and data position; every ``--checkpoint-every`` steps and at each
epoch end) and ``summary.json``.  ``--resume`` continues an interrupted run to the same
result it would have reached uninterrupted.  Every departure from the protocol (a changed
setting, or a limit such as ``--max-steps``, ``--max-train-chars``, ``--valid-batches``) is
recorded in the summary, and the report prints it beside the run's perplexity.
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
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import DEFAULT_CACHE, DEFAULT_ROOT, context_batches, load_ptb, load_wiki, run_script, sentence_batches  # noqa: E402
from methods import label_of  # noqa: E402

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
RUN_DEFAULTS = dict(
    method="dsf", feedback="linspace", iterations=1, momentum=0.9, seed=0, compiler="inductor", device="auto",
    tf32=True, data_root=str(DEFAULT_ROOT), cache=str(DEFAULT_CACHE), use_datasets=True, log_every=50,
    checkpoint_every=500, max_steps=0, max_train_chars=0, valid_batches=0, fidelity_every=0,
)
# flags restricted to a list of values
CHOICES = dict(method=("dsf", "ft", "highway", "bptt"), feedback=("linspace", "uniform", "adaptive"),
               compiler=("inductor", "aot_eager"), device=("auto", "cpu", "cuda"), data=("ptb", "wiki"),
               model=("stack", "blocks"), cell=("gru", "lstm", "rnn", "gru-loop"), schedule=("step", "cosine"))
HELP = dict(
    method="training method, through dsf_compile.apply(model, mode=method)",
    feedback="λ of mode dsf: the paper's linspace, uniform random, or adaptive (estimated in the backward)",
    iterations="Highway-BP refinements (method highway)",
    momentum="smoothing of adaptive λ across steps (feedback adaptive)",
    fidelity_every="every N steps, log the cosine of the method's gradient to exact BPTT's (0: never)",
)
# Limits a run may be given that shorten the protocol whenever they are set.
RUN_LIMITS = ("max_steps", "max_train_chars", "valid_batches")


def deviations(config: dict) -> dict:
    """Every setting of a run that departs from its protocol (DESIGN.md §5, TF32 included):
    the report writes these beside the run's perplexity, so no change goes unstated."""
    protocol = {**CONFIGS[config["config"]], "tf32": True}
    changed = {key: config[key] for key, value in protocol.items() if config[key] != value}
    return {**changed, **{key: config[key] for key in RUN_LIMITS if config[key]}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default=None, help="the protocol (default: ptb)")
    parser.add_argument("--out", required=True, help="run folder (log, checkpoint, summary)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    for key, value in {**CONFIGS["wiki"], **RUN_DEFAULTS}.items():
        flag = "--" + key.replace("_", "-")
        help_text = HELP.get(key, f"protocol setting (default: the config's, here {value!r} for wiki)")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None, help=help_text)
        elif isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="*", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=None, choices=CHOICES.get(key), help=help_text)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    name = args.config or "ptb"
    config = {"config": name, **CONFIGS[name], **RUN_DEFAULTS}
    config.update({k: v for k, v in vars(args).items() if k in config and v is not None})
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return config


class Data:
    """Training and validation batches of one protocol, in an order fixed by seed and epoch."""

    def __init__(self, config: dict) -> None:
        self.config = config
        if config["data"] == "ptb":
            corpus = load_ptb(config["data_root"], max_len=config["context"])
            self.vocab_size, self.pad, self.corpus = len(corpus.vocab), corpus.pad, corpus
            self.source = "ptb"
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
    with torch.no_grad():
        for x, y in data.valid():
            x, y = x.to(device), y.to(device)
            n = int((y != data.pad).sum())
            total += masked_cross_entropy(forward(x), y, data.pad).item() * n
            count += n
    return math.exp(total / count)


def method_options(config: dict) -> dict:
    """The apply() options the run's method reads (the others must not be passed)."""
    options = {}
    if config["method"] == "highway":
        options["iterations"] = config["iterations"]
    if config["feedback"] == "adaptive":
        options["momentum"] = config["momentum"]
    return options


def method_label(config: dict) -> str:
    """The method as the report names it: dsf, dsf-adaptive, highway-k2, ..."""
    return label_of(config["method"], config["feedback"], config["iterations"])


def save_checkpoint(path: Path, **state) -> None:
    state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        config = checkpoint["config"]
        # a resumed run may be given a later stopping point, nothing else: a changed
        # setting, logging included, would make it another run than the one it continues
        changed = {key: value for key, value in vars(args).items()
                   if key in config and key != "max_steps" and value is not None and value != config[key]}
        if changed:
            raise SystemExit("--resume continues a run as it was started; it cannot change "
                             + ", ".join(f"--{k.replace('_', '-')} (the run has {config[k]!r})" for k in changed)
                             + ". Start another run with --out for other settings.")
        if args.max_steps is not None:
            config["max_steps"] = args.max_steps
    else:
        if checkpoint_path.exists():
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
        config = resolve_config(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])
    device = config["device"]

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
    dsf_compile.apply(model, config["method"], config["feedback"], seed=config["seed"], compiler=config["compiler"],
                      **method_options(config))
    log = (out / "log.jsonl").open("a")

    def record(**entry) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def checkpoint_now() -> None:
        save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), state=state, config=config)

    total_steps = steps_per_epoch * config["epochs"]
    print(f"{config['config']} / {method_label(config)}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{steps_per_epoch} steps per epoch, {config['epochs']} epochs, data {data.source}, device {device}")
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    stopped = False
    last_step = min(total_steps, config["max_steps"]) if config["max_steps"] else total_steps
    bar = None  # made after this process's first step, so that its ETA leaves compilation out
    while state["epoch"] < config["epochs"] and not stopped:
        batches = data.train(state["epoch"])
        for x, y in batches[state["batch"] :]:
            if config["max_steps"] and state["step"] >= config["max_steps"]:
                stopped = True
                break
            x, y = x.to(device), y.to(device)
            if config["fidelity_every"] and state["step"] % config["fidelity_every"] == 0:
                fidelity = dsf_compile.gradient_fidelity(
                    model, lambda x=x, y=y: masked_cross_entropy(model(x), y, data.pad))
                record(kind="fidelity", step=state["step"], epoch=state["epoch"], tokens=state["tokens"],
                       cosine=fidelity.cosine, relative_error=fidelity.relative_error,
                       parameters={p.name: p.cosine for p in fidelity.parameters})
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
            if bar is None:
                bar = tqdm(total=last_step, initial=state["step"], unit="step", dynamic_ncols=True, disable=None,
                           desc=method_label(config))
            else:
                bar.update()
            if state["step"] % config["log_every"] == 0 or state["step"] == 1:
                elapsed = time.perf_counter() - window_start
                mean = window_loss / window_tokens
                rate = window_tokens / elapsed
                tqdm.write(f"epoch {state['epoch'] + 1} step {state['step']}/{total_steps}  loss {mean:.3f}  "
                           f"ppl {math.exp(mean):.1f}  {rate:,.0f} tok/s")
                record(kind="train", step=state["step"], epoch=state["epoch"], tokens=state["tokens"], loss=mean,
                       ppl=math.exp(mean), tokens_per_s=rate, lr=scheduler.get_last_lr()[0])
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if config["checkpoint_every"] and state["step"] % config["checkpoint_every"] == 0:
                checkpoint_now()
        else:
            valid = evaluate(model, data, device)
            state["best_valid_ppl"] = min(state["best_valid_ppl"], valid)
            state["epoch"] += 1
            state["batch"] = 0
            tqdm.write(f"epoch {state['epoch']}: valid ppl {valid:.2f} (best {state['best_valid_ppl']:.2f})")
            record(kind="valid", epoch=state["epoch"], step=state["step"], tokens=state["tokens"], valid_ppl=valid)
        checkpoint_now()
    if bar is not None:
        bar.close()
    valid_at_stop = None
    if stopped:  # a run cut short still ends with a validation and a line saying so
        valid_at_stop = evaluate(model, data, device)
        print(f"stopped by --max-steps at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']}): "
              f"valid ppl {valid_at_stop:.2f}; --resume continues it", flush=True)
        record(kind="valid_at_stop", epoch=state["epoch"], step=state["step"], tokens=state["tokens"],
               valid_ppl=valid_at_stop)
    log.close()
    summary = {
        "config": config["config"], "method": method_label(config),
        "best_valid_ppl": state["best_valid_ppl"] if math.isfinite(state["best_valid_ppl"]) else None,
        "tokens": state["tokens"], "epochs": state["epoch"], "steps": state["step"], "complete": not stopped,
        "valid_ppl_at_stop": valid_at_stop,
        "data": data.source, "width": config["width"], "layers": config["layers"], "cell": config["cell"],
        "train_seconds": state["train_seconds"], "device": device,
        "deviations": deviations(config), "settings": config,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    run_script(main)
