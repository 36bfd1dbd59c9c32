import os

import pytest
import torch

# Kernels run by Triton's interpreter need it switched on before Triton is imported:
# tests/test_triton_scan.py runs them in a subprocess that does so.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
