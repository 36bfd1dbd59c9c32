"""What a script says while it trains: a bar on a terminal; elsewhere (a file, nohup, CI),
a plain line at least every ``PLAIN_EVERY_S`` seconds, so that no minute passes silent."""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm


class Progress:
    """Steps ``first`` … ``last`` of a run labelled ``label``: :meth:`step` after each,
    :meth:`write` for a line of its own, :meth:`close` at the end."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, label: str, first: int, last: int) -> None:
        self.label, self.last = label, last
        self.interactive = sys.stdout.isatty()
        self.bar = None
        self.first, self.started, self.printed = first, time.perf_counter(), time.perf_counter()

    def step(self, step: int) -> None:
        if self.interactive:
            if self.bar is None:  # made after the first step, so that its ETA leaves compilation out
                self.bar = tqdm(total=self.last, initial=step, unit="step", dynamic_ncols=True, desc=self.label)
            else:
                self.bar.update()
            return
        now = time.perf_counter()
        if now - self.printed >= self.PLAIN_EVERY_S:
            done = step - self.first
            rate = done / (now - self.started)
            eta = (self.last - step) / rate if rate > 0 else math.inf
            print(f"{self.label}: step {step}/{self.last}, {rate:.2f} steps/s, about {eta / 60:.0f} min left",
                  flush=True)
            self.printed = now

    def write(self, line: str) -> None:
        if self.bar is not None:
            tqdm.write(line)
        else:
            print(line, flush=True)
        self.printed = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
