"""Where a node came from in the user's program, from the metadata Dynamo leaves on it."""

from __future__ import annotations

import re

import torch.fx


def user_source(node: torch.fx.Node) -> str:
    """``file:line`` of the innermost user frame that produced ``node`` ("?" if unknown)."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    if not frames:
        return "?"
    # 'File "/path/model.py", line 12, in forward'
    parts = frames[-1].split('"')
    if len(parts) < 3:
        return frames[-1]
    line = parts[2].split(",")[1].strip().removeprefix("line ")
    return f"{parts[1]}:{line}"


def module_path(node: torch.fx.Node) -> str:
    """The dotted name of the innermost nn.Module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # Dynamo names modules from the frame's locals: "L['self'].encoder.rnn"
    return re.sub(r"^L\['[^']*'\]\.?", "", path)
