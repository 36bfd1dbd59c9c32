"""Where a node came from in the user's program, from the metadata Dynamo leaves on it."""

from __future__ import annotations

import ast
import contextvars
import operator
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.fx

# frames that are not the user's: torch's, and this package's own (but its reference models)
_PACKAGE = str(Path(__file__).resolve().parents[1])
_NOT_THE_USERS = (os.path.dirname(torch.__file__), _PACKAGE)
_MODELS = os.path.join(_PACKAGE, "models")
# where the user called the model whose graph is being compiled (for nodes that carry no
# frame of the user's code: a bare nn.GRU applied and called)
CALL_SITE: contextvars.ContextVar[str] = contextvars.ContextVar("dsf_call_site", default="?")


def _is_users(path: str) -> bool:
    path = os.path.abspath(path)
    return path.startswith(_MODELS) or not path.startswith(_NOT_THE_USERS)


def _frames(node: torch.fx.Node) -> list[str]:
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines()]
    return [line for line in lines if line.startswith("File ") and _is_users(line.split('"')[1])]


def assigned_name(node: torch.fx.Node) -> str | None:
    """The name the user's code assigns ``node``'s value to, read off the source lines in
    its stack trace, innermost frame first (``h = cell(x[t], h)`` → ``h``; the second value
    of ``h, c = lstm(x[t], (h, c))`` → ``c``); None where no line says."""
    trace = (node.meta.get("stack_trace") or "").splitlines()
    lines = [(trace[i].strip(), trace[i + 1].strip() if i + 1 < len(trace) else "")
             for i in range(len(trace)) if trace[i].strip().startswith("File ")]
    position = node.args[1] if node.target is operator.getitem and isinstance(node.args[1], int) else None
    for frame, code in reversed(lines):
        if not _is_users(frame.split('"')[1]):
            continue
        targets = _assignment_targets(code)
        if targets is None:
            continue
        if len(targets) == 1:
            return targets[0]
        return targets[position] if position is not None and position < len(targets) else None
    return None


def _assignment_targets(code: str) -> list[str] | None:
    """The names a line's first assignment assigns (``a, b = ...`` → [a, b]), None if it has
    none or assigns to something else than names."""
    try:
        statements = ast.parse(code).body
    except SyntaxError:
        return None
    assignment = next((s for s in statements if isinstance(s, ast.Assign) and len(s.targets) == 1), None)
    if assignment is None:
        return None
    target = assignment.targets[0]
    elements = target.elts if isinstance(target, ast.Tuple) else [target]
    if not all(isinstance(e, ast.Name) for e in elements):
        return None
    return [e.id for e in elements]


def _format(frame: str) -> str:
    # 'File "/path/model.py", line 12, in forward'
    parts = frame.split('"')
    if len(parts) < 3:
        return frame
    line = parts[2].split(",")[1].strip().removeprefix("line ")
    return f"{parts[1]}:{line}"


def user_source(node: torch.fx.Node) -> str:
    """``file:line`` of the innermost frame of the user's code that produced ``node`` (torch's
    and this package's frames are not the user's); where there is none, the line that
    called the model (:data:`CALL_SITE`)."""
    frames = _frames(node)
    return _format(frames[-1]) if frames else CALL_SITE.get()


def users_frame():
    """The innermost frame of the caller's stack that is the user's code (None if none)."""
    frame = sys._getframe(1)
    while frame is not None and not _is_users(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def where_called() -> str:
    """``file:line`` of the innermost frame of the user's code on the stack."""
    frame = users_frame()
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def warn_at_user(message: str, category: type[Warning] = UserWarning) -> None:
    """A warning that points at the user's line (the call of the model), not at torch's
    ``module.py`` or this package."""
    frame = users_frame()
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


def common_source(nodes: list[torch.fx.Node]) -> str:
    """Where all ``nodes`` run, as ``file:line``: for the nodes of one loop step, the line
    in the loop that calls the step (``h = cell(x[:, t], h)``).  Their innermost shared
    frame; where the step spans several lines of one function (``h = cell(x, h)`` then
    ``y = head(h)``), the first of them."""
    stacks = [_frames(n) for n in nodes if _frames(n)]
    if not stacks:
        return CALL_SITE.get()
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
