"""An applied model under data parallelism: DDP, and FSDP2's ``fully_shard`` (the whole
model as one unit, or the recurrent module as its own unit), each on 2 CPU processes
with gloo, half of the batch each.  Their averaged gradients must equal one process's
DSF gradients on the full batch: the rewrite is per sample, so sharding the batch must
not change it."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import dsf_compile
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

BATCH, LENGTH, VOCAB = 4, 6, 7
# A worker normally finishes in seconds.  Past this the run is taken as hung: CI must end
# with a verdict, never wait on a stuck process.
DEADLINE_S = 120


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 4)
        self.rnn = nn.GRU(4, 5, 2)
        self.head = nn.Linear(5, VOCAB)

    def forward(self, tokens):
        return self.head(self.rnn(self.embedding(tokens))[0])


def _data():
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (LENGTH, BATCH), generator=generator),
            torch.randint(0, VOCAB, (LENGTH, BATCH), generator=generator))


def _loss(model, tokens, targets):
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


class _HalfFeedback(dsf_compile.Rule):
    """A user's rule: DSF at λ = 1/2, written with the public primitives."""

    def deltas(self, loop):
        return loop.scan(loop.g, 0.5)

    def initial_gradient(self, loop, delta):
        return 0.5 * loop.first(delta)

    def describe(self):
        return "half feedback"


# the rules trained under data parallelism (auto with a target any k meets: k = 0 on every
# rank, so the ranks' backward is the one process's)
RULES = {"dsf": lambda: {}, "tbptt": lambda: {"mode": "tbptt", "window": 2},
         "auto": lambda: {"mode": "auto", "target": 1e-9}, "rule": lambda: {"mode": _HalfFeedback()}}


def _worker(rank: int, init: str, wrapping: str, out: str, rule: str = "dsf") -> None:
    # the parent asks for every thread's stack with SIGUSR1 before it kills a hung worker
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # the peers talk over loopback: the machine's hostname need not resolve (CI has no network)
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a stuck collective fails the test within a minute instead of hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    _reached(out, rank, "grouped")
    try:
        torch.manual_seed(0)
        model = _LM().double()
        if wrapping == "ddp":
            dsf_compile.apply(model, compiler="aot_eager", **RULES[rule]())
            trained = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            if wrapping == "fsdp-model":
                dsf_compile.apply(model, compiler="aot_eager")
            else:  # the recurrent module is its own unit: apply to it, after sharding
                fully_shard(model.rnn)
                dsf_compile.apply(model.rnn, compiler="aot_eager")
            trained = fully_shard(model)
        tokens, targets = _data()
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        _loss(trained, tokens[:, half], targets[:, half]).backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        applied = model if wrapping != "fsdp-rnn" else model.rnn
        report = dsf_compile.report(applied)
        if rank == 0:
            torch.save({"grads": grads, "loops": [loop.rewrite for loop in report.loops],
                        "breaks": report.graph_breaks, "eager": report.eager_calls}, out)
        dist.barrier()  # neither rank tears the group down while the other still uses it
        _reached(out, rank, "trained")
    finally:
        dist.destroy_process_group()


def _marker(out, phase: str, rank: int) -> str:
    return f"{out}.{phase}{rank}"


def _reached(out: str, rank: int, phase: str) -> None:
    open(_marker(out, phase, rank), "w").close()


def _all_reached(out, phase: str) -> bool:
    return all(os.path.exists(_marker(out, phase, rank)) for rank in range(2))


def _run_workers(wrapping: str, out, rule: str = "dsf") -> None:
    """Runs the two workers to the end, or to ``DEADLINE_S``.  A run that times out is told
    apart by how far the workers got: no process group formed is this machine's gloo, not
    the rewrite (skip, saying so); both ranks done but not exited is torch's teardown, and
    rank 0's saved gradients are still checked; stuck in between fails, with every
    thread's stack of both workers in the captured output."""
    context = mp.start_processes(_worker, args=(f"file://{out}.init", wrapping, str(out), rule), nprocs=2,
                                 join=False)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if context.join(timeout=max(0.0, deadline - time.monotonic())):
            return
    for process in context.processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGUSR1)
    time.sleep(2)  # the stacks are written before the workers are killed
    for process in context.processes:
        process.kill()
        process.join()
    if _all_reached(out, "trained"):
        warnings.warn(f"{wrapping}: both workers finished but did not exit in {DEADLINE_S} s; killed", stacklevel=2)
        return
    if not _all_reached(out, "grouped"):
        pytest.skip(f"gloo could not form a group of 2 processes on this machine in {DEADLINE_S} s")
    pytest.fail(f"{wrapping}: the workers hung after forming their process group (stacks above)")


@pytest.mark.parametrize("wrapping,rule", [("ddp", "dsf"), ("fsdp-model", "dsf"), ("fsdp-rnn", "dsf"),
                                          ("ddp", "tbptt"), ("ddp", "auto"), ("ddp", "rule")])
def test_data_parallel_gradients_equal_one_process_on_the_full_batch(tmp_path, wrapping, rule):
    if wrapping != "ddp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
    out = tmp_path / "rank0.pt"
    _run_workers(wrapping, out, rule)
    found = torch.load(out)
    torch.manual_seed(0)
    model = dsf_compile.apply(_LM().double(), compiler="aot_eager", **RULES[rule]())
    described = model._dsf_backend.rule.describe()
    assert found["loops"] == [described, described] and not found["breaks"] and not found["eager"]

    _loss(model, *_data()).backward()
    for (name, p), got in zip(model.named_parameters(), found["grads"]):
        assert rel_err(got, p.grad) <= 1e-12, name
