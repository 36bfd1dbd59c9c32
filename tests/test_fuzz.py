"""Differential fuzzing of ``apply`` on generated hand-written RNN programs (see
``tests/fuzz_programs.py`` for what is generated and the invariant checked).

CI runs a small fixed budget (``derandomize``: the same programs every run).  A long run:
``DSF_FUZZ_EXAMPLES=300 DSF_FUZZ_RANDOM=1 DSF_FUZZ_COUNTS=counts.json python -m pytest -q
tests/test_fuzz.py`` writes how many programs were tried, rewritten and left exact.
"""

import collections
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from .fuzz_programs import CELLS, OUTPUTS, SLICES, Program, check_invariant

EXAMPLES = int(os.environ.get("DSF_FUZZ_EXAMPLES", "10"))
COUNTS: collections.Counter = collections.Counter()


@st.composite
def programs(draw) -> Program:
    cell = draw(st.sampled_from(CELLS))
    batch, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    # a (features, batch) state is told apart by its shape only: not when both sizes agree
    columns = cell == "tanh" and batch != hidden and draw(st.booleans())
    in_place = not columns and draw(st.integers(0, 3)) == 0
    return Program(
        cell=cell,
        slicing=draw(st.sampled_from(SLICES)),
        reverse=draw(st.booleans()),
        mask=not columns and draw(st.booleans()),
        embedding=draw(st.booleans()),
        in_place=in_place,
        columns=columns,
        # (1, B, H) + an in-place add of a (B, H) value would not run eagerly either
        leading_one=not columns and not in_place and draw(st.integers(0, 3)) == 0,
        output=draw(st.sampled_from(("states", "last") if columns else OUTPUTS)),
        batch=batch,
        length=draw(st.integers(2, 5)),
        features=draw(st.integers(1, 4)),
        hidden=hidden,
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("DSF_FUZZ_RANDOM"),
          database=None)
@given(program=programs(), mode=st.sampled_from(["dsf", "ft", "bptt"]), seed=st.integers(0, 2**16))
def test_generated_programs_keep_the_invariant(program, mode, seed):
    COUNTS["tried"] += 1
    COUNTS[check_invariant(program, mode, seed)] += 1
    if os.environ.get("DSF_FUZZ_COUNTS"):
        with open(os.environ["DSF_FUZZ_COUNTS"], "w") as f:
            json.dump(dict(COUNTS), f)
