"""Where a node came from in the user's program, from the metadata Dynamo leaves on it."""

from __future__ import annotations

import re
from pathlib import Path

import torch.fx

# the frame of traced_rnn's stand-in for torch's RNN functions is not the user's
_STAND_IN = f'File "{Path(__file__).resolve().parents[1] / "traced_rnn.py"}"'


def _frames(node: torch.fx.Node) -> list[str]:
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines()]
    return [line for line in lines if line.startswith("File ") and not line.startswith(_STAND_IN)]


def _format(frame: str) -> str:
    # 'File "/path/model.py", line 12, in forward'
    parts = frame.split('"')
    if len(parts) < 3:
        return frame
    line = parts[2].split(",")[1].strip().removeprefix("line ")
    return f"{parts[1]}:{line}"


def user_source(node: torch.fx.Node) -> str:
    """``file:line`` of the innermost user frame that produced ``node`` ("?" if unknown)."""
    frames = _frames(node)
    return _format(frames[-1]) if frames else "?"


def common_source(nodes: list[torch.fx.Node]) -> str:
    """The innermost frame shared by all ``nodes``: for the nodes of one loop step, the
    line in the loop that calls the step (``h = cell(x[:, t], h)``)."""
    stacks = [_frames(n) for n in nodes if _frames(n)]
    if not stacks:
        return "?"
    common = stacks[0]
    for frames in stacks[1:]:
        n = 0
        while n < min(len(common), len(frames)) and common[n] == frames[n]:
            n += 1
        common = common[:n]
    return _format(common[-1]) if common else _format(stacks[0][-1])


def module_path(node: torch.fx.Node) -> str:
    """The dotted name of the innermost nn.Module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # Dynamo names modules from the frame's locals: "L['self'].encoder.rnn"; a compiled
    # method called from another one is reached through apply's wrapper of that method:
    # "L['self'].forward.compiled_model.encoder.rnn"
    return re.sub(r"^L\['[^']*'\]\.?(\w+\.compiled_model\.)?", "", path)
