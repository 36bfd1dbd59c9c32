"""What every result file records about how it was made: the git commit of the code, the
torch version, the device and the exact command.

On a machine that received a copy of the working tree without its ``.git`` (the lent GPU
machine), the commit comes from ``DSF_COMMIT`` in the environment, which
``experiments/gpu_suite.py`` sets from the manifest ``--prepare`` wrote next to the data.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> dict:
    """``{"commit", "dirty", "commit_source"}`` of the code in this checkout: from git
    when it answers, else from ``DSF_COMMIT`` (and ``DSF_COMMIT_DIRTY``), else unknown."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip()), "commit_source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("DSF_COMMIT"):
        dirty = os.environ.get("DSF_COMMIT_DIRTY")
        return {"commit": os.environ["DSF_COMMIT"], "dirty": None if dirty is None else dirty == "1",
                "commit_source": os.environ.get("DSF_COMMIT_SOURCE", "DSF_COMMIT")}
    return {"commit": None, "dirty": None, "commit_source": "unknown (no git, no DSF_COMMIT)"}


def device_name(device: str | torch.device | None = None) -> str:
    """The accelerator's name (``NVIDIA H100 80GB HBM3``), or ``cpu-<machine>``."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command that is running, as one could type it again (``python experiments/x.py ...``)."""
    if argv is None:
        argv = sys.argv[1:]
        script = script or sys.argv[0]
    path = Path(script or "?")
    try:
        path = path.resolve().relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(path), *argv])


def record(command: str, device: str | torch.device | None = None) -> dict:
    """The provenance fields of a result file."""
    return {**git_commit(), "torch": torch.__version__, "device": device_name(device), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
