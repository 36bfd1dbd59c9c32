"""The Triton scan kernels on CPU, through Triton's interpreter (a GPU runs them compiled).

The interpreter must be switched on before Triton is imported, so the checks live in
``tests/interpreted/`` and run in a subprocess with ``TRITON_INTERPRET=1``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it on Linux x86-64)")
pytest.importorskip("numpy", reason="Triton's interpreter needs numpy")

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
