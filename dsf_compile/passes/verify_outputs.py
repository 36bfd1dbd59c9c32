"""Check: a rewritten graph returns what the graph Dynamo traced returns.

A rewrite may change only gradients, never the forward (DESIGN.md §1).  Dynamo records the
shape and dtype of every value it traces; after the rewrites, the graph is run on fake
tensors (shapes and dtypes only, no arithmetic) and each output compared with what Dynamo
recorded for it.  A mismatch is a bug of a rewrite; the backend then rewrites the loops one
at a time, each checked, and leaves the one that changes an output exact, with the
mismatch as its reason, instead of returning a wrong shape or crashing later.  Strides are
not compared: a rewrite may lay out a value differently.
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_flatten


def output_metadata(gm: torch.fx.GraphModule) -> list:
    """What Dynamo recorded for each of ``gm``'s outputs (a fake tensor, a size, or None)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, _ = tree_flatten(output.args)
    return [leaf.meta.get("example_value") if isinstance(leaf, torch.fx.Node) else None for leaf in leaves]


def changed_outputs(gm: torch.fx.GraphModule, expected: list) -> str | None:
    """How ``gm``'s outputs differ in shape or dtype from ``expected`` (None if they do not):
    ``gm`` run on the fake values Dynamo recorded for its inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("example_value") for n in placeholders]
    mode = next((i.fake_mode for i in inputs if isinstance(i, FakeTensor)), None)
    if mode is None or any(i is None for i in inputs):
        return None  # nothing recorded to run it on (not a graph from Dynamo)
    with mode:
        results = FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    got, _ = tree_flatten(results)
    if len(got) != len(expected):
        return f"the number of the graph's outputs ({len(expected)} → {len(got)})"
    for i, (want, have) in enumerate(zip(expected, got)):
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(have, torch.Tensor):
            return f"output {i} from a tensor to {type(have).__name__}"
        same_shape = want.dim() == have.dim() and all(
            statically_known_true(a == b) for a, b in zip(want.shape, have.shape))
        if not same_shape or want.dtype != have.dtype:
            return (f"output {i} from {tuple(want.shape)} {want.dtype} to {tuple(have.shape)} {have.dtype}")
    return None
