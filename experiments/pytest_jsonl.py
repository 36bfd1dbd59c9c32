"""A pytest plugin that appends one JSON line per test outcome to ``$DSF_TEST_LOG`` as each
test finishes, so that a run killed at a time cap still says what passed, failed and was
skipped up to there (``gpu_suite.py``'s tests phase loads it with ``-p pytest_jsonl``)."""

from __future__ import annotations

import json
import os

_LAST_LINES = 30


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("DSF_TEST_LOG")
    if not path:
        return
    # one outcome per test: its call, or the setup/teardown phase that failed or skipped it
    if report.when != "call" and not (report.failed or report.skipped):
        return
    entry = {"id": report.nodeid, "when": report.when, "outcome": report.outcome,
             "seconds": round(report.duration, 3)}
    if report.failed:
        entry["lines"] = str(report.longrepr).splitlines()[-_LAST_LINES:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["reason"] = report.longrepr[2]
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
