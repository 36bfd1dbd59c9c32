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
    """Where all ``nodes`` run, as ``file:line``: for the nodes of one loop step, the line
    in the loop that calls the step (``h = cell(x[:, t], h)``).  Their innermost shared
    frame; where the step spans several lines of one function (``h = cell(x, h)`` then
    ``y = head(h)``), the first of them."""
    stacks = [_frames(n) for n in nodes if _frames(n)]
    if not stacks:
        return "?"
    depth = 0
    while all(len(f) > depth for f in stacks) and len({_function(f[depth]) for f in stacks}) == 1:
        if len({f[depth] for f in stacks}) > 1:  # one function, several of its lines
            return min((_format(f[depth]) for f in stacks), key=_line_number)
        depth += 1
    return _format(stacks[0][depth - 1]) if depth else _format(stacks[0][-1])


def _function(frame: str) -> tuple[str, str]:
    """(file, function) of a ``File "...", line N, in name`` frame."""
    parts = frame.split('"')
    return (parts[1], parts[2].rsplit(" in ", 1)[-1]) if len(parts) >= 3 else (frame, "")


def _line_number(source: str) -> int:
    line = source.rsplit(":", 1)[-1]
    return int(line) if line.isdigit() else 0


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


def user_name(node: torch.fx.Node) -> str:
    """The name the user's program gives a value, as far as Dynamo's node names tell it:
    ``l_inputs_`` (an argument ``inputs``) → ``inputs``, ``h_3`` (step 3's ``h``) → ``h``,
    ``l_self_modules_rnn_parameters_weight_`` → ``self.rnn.weight``."""
    name = node.name
    if name.startswith(("l_", "L_")):
        name = name[2:].rstrip("_")
        if name.startswith("self_"):
            name = "self." + re.sub(r"(modules|parameters|buffers)_", "", name[5:]).replace("_", ".")
    return re.sub(r"_\d+$", "", name)
