"""Front end: re-roll Python loops that Dynamo unrolled into T copies of a step.

A Python ``for`` loop over time reaches the graph as T consecutive copies of the step's
nodes.  The search is anchored on **per-step inputs**: families of slices of one tensor
indexed by the step (``x[:, t]``, ``x[t]``, ``mask[:, t, None]``, ``x[:, t:t+1]``,
``x.narrow(d, t, 1)``, ``x.unbind(d)[t]``, ``x.split(1, d)[t]``, ``x.select(d, t)``).
The first uses of a family's members, in program order, must be
evenly spaced: that spacing is the step's size, and it proposes a segmentation of the
graph into T segments (tried at every phase).

A proposal is accepted only after a structural check of every step against the first
(same ops, same constants, each argument either internal to the step, a value of the
previous step — a carry —, a member of a step-input family at the matching index, or
the same outside value — a loop invariant).  Among valid phases the one with the
fewest carries wins, then the one whose carries are the values the program uses after
the loop.  Anything else is left exact with the reason the check gave.
"""

from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_flatten

from ..cells import DECOMPOSED_CELL_OPS
from ..loop_ir import LeftExact, LoopIR
from .find_rnn_ops import RECURRENT_OPS
from .provenance import assigned_name, common_source, module_path, user_name

_SEQUENCE_SPLITS = {"unbind", "split", "chunk"}
_RANDOM_OPS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "uniform", "poisson", "exponential")


def _name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_call(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method")


@dataclass
class StepInputFamily:
    """Slices of ``source`` taken one per step; ``members`` maps index → slice node."""

    key: tuple
    source: torch.fx.Node
    kind: str  # "index" (getitem or narrow), "sequence" (unbind/split/chunk), "select"
    dim: int
    members: dict[int, torch.fx.Node] = field(default_factory=dict)
    # For "index": what the slices index besides time, applied to the (T, ...) stack of
    # the source's steps (``mask[:, t, None]`` → ``[:, :, None]``); () when nothing.
    after: tuple = ()

    def kept_time_axis(self) -> int | None:
        """The axis of size 1 in place of time that each piece of a split or chunk keeps
        (``x.split(1, d)`` → d, non-negative), None for slices that drop it."""
        if self.kind != "sequence" or _name(self.source) == "unbind":
            return None
        return self.dim % self.source.args[0].meta["example_value"].dim()


def _unit_slice(entry) -> bool:
    """``t:t+1``, a step kept as an axis of size 1."""
    return (isinstance(entry, slice) and isinstance(entry.start, int) and entry.start >= 0
            and entry.stop == entry.start + 1 and entry.step in (None, 1))


def _step_of_index(idx: tuple) -> tuple[int, int, tuple, str] | None:
    """(tensor dim, step, index of the rest, pattern) if ``x[idx]`` takes one step of
    ``x``: one int or ``t:t+1`` entry, the others ``:`` or ``None``."""
    steps = [i for i, e in enumerate(idx) if isinstance(e, int) or _unit_slice(e)]
    if len(steps) != 1:
        return None
    (k,) = steps
    if not all(e is None or e == slice(None) for i, e in enumerate(idx) if i != k):
        return None
    entry = idx[k]
    dim = sum(e is not None for e in idx[:k])
    step = entry if isinstance(entry, int) else entry.start
    rest = idx[:k] + ((None,) if isinstance(entry, slice) else ()) + idx[k + 1 :]
    after = rest if any(e is None for e in rest) else ()
    pattern = repr(tuple(("t:t+1" if isinstance(entry, slice) else "t") if i == k else e for i, e in enumerate(idx)))
    return dim, step, after, pattern


def _slice_of(node: torch.fx.Node) -> tuple[tuple, torch.fx.Node, str, int, int, tuple] | None:
    """(family key, source, kind, dim, index, after) if ``node`` takes one step of a tensor."""
    if node.op == "call_function" and node.target is operator.getitem:
        src, idx = node.args
        if not isinstance(src, torch.fx.Node):
            return None
        if _is_call(src) and _name(src) in _SEQUENCE_SPLITS and isinstance(idx, int):
            dim = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
            if _name(src) == "unbind":
                dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
            return ("sequence", src), src, "sequence", dim, idx, ()
        example = src.meta.get("example_value")
        if not isinstance(example, torch.Tensor):
            return None
        found = _step_of_index(idx if isinstance(idx, tuple) else (idx,))
        if found is not None:
            dim, step, after, pattern = found
            return ("index", src, pattern), src, "index", dim, step, after
    if _is_call(node) and _name(node) == "select" and len(node.args) == 3:
        src, dim, idx = node.args
        if isinstance(src, torch.fx.Node) and isinstance(dim, int) and isinstance(idx, int):
            return ("select", src, dim), src, "select", dim, idx, ()
    if _is_call(node) and _name(node) == "narrow" and len(node.args) == 4 and not node.kwargs:
        src, dim, start, length = node.args
        example = src.meta.get("example_value") if isinstance(src, torch.fx.Node) else None
        if isinstance(example, torch.Tensor) and isinstance(dim, int) and isinstance(start, int) and length == 1:
            dim = dim % example.dim()
            after = (slice(None),) * dim + (None,)
            return ("index", src, f"narrow({dim}, t, 1)"), src, "index", dim, start, after
    return None


def step_input_families(graph: torch.fx.Graph) -> dict[torch.fx.Node, StepInputFamily]:
    """Every family with at least two members, keyed by member node.  A slice taken again
    (``x[t]`` read by a forward loop, then by a backward one) joins the next family of the
    same source and pattern: each family holds one slice per step."""
    families: dict[tuple, StepInputFamily] = {}
    for node in graph.nodes:
        found = _slice_of(node)
        if found is None:
            continue
        key, src, kind, dim, index, after = found
        occurrence = 0
        while index in families.get((*key, occurrence), StepInputFamily(key, src, kind, dim)).members:
            occurrence += 1
        family = families.setdefault((*key, occurrence), StepInputFamily(key, src, kind, dim, after=after))
        family.members[index] = node
    return {m: f for f in families.values() if len(f.members) > 1 for m in f.members.values()}


@dataclass
class PythonLoop:
    """A verified re-rollable loop: the LoopIR plus how it is wired into the graph."""

    loop: LoopIR
    segments: list[list[torch.fx.Node]]
    pieces: list[torch.fx.Node]  # getitems of in-step splits, part of their step
    step_inputs: list[tuple[StepInputFamily, list[int]]]  # family, index used at each step
    init: list[torch.fx.Node]  # initial value of each carry
    invariants: list[torch.fx.Node]
    carry_positions: list[int]  # position in a segment of each carry's new value
    epilogue: torch.fx.GraphModule | None  # per-step outputs that are not carries
    epilogue_invariants: list[torch.fx.Node]
    epilogue_positions: list[int]


class NotALoop(Exception):
    """Why a proposed segmentation is not a loop we can re-roll.  ``settled``: the steps
    were read as one computation repeated (the reason is about the loop, not about where
    its steps were looked for), which makes it the reason a report gives."""

    def __init__(self, reason: str, settled: bool = False) -> None:
        super().__init__(reason)
        self.settled = settled


@dataclass
class _Check:
    carry_slots: dict[tuple[int, int], int] = field(default_factory=dict)
    init: dict[int, torch.fx.Node] = field(default_factory=dict)
    step_slots: dict[tuple[int, int], tuple[StepInputFamily, int]] = field(default_factory=dict)


def _flat_args(node: torch.fx.Node):
    return tree_flatten((node.args, node.kwargs))


def _check_segments(segments, families) -> _Check:
    """Structural isomorphism of every step with the first (see module docstring)."""
    where = {node: (t, k) for t, seg in enumerate(segments) for k, node in enumerate(seg)}
    check = _Check()
    first = segments[0]
    first_args = [_flat_args(a) for a in first]
    for t in range(1, len(segments)):
        for k, (a, b) in enumerate(zip(first, segments[t])):
            if a.op != b.op or a.target != b.target:
                raise NotALoop(f"step {t} differs from step 0 at its op {k}: {_name(a)} vs {_name(b)}")
            leaves_a, spec_a = first_args[k]
            leaves_b, spec_b = _flat_args(b)
            if spec_a != spec_b:
                raise NotALoop(f"step {t} differs from step 0: {_name(a)} called with other arguments")
            for i, (la, lb) in enumerate(zip(leaves_a, leaves_b)):
                _check_leaf(t, k, i, la, lb, where, families, check)
    for t, seg in enumerate(segments):
        for node in seg:
            for user in node.users:
                if user in where and where[user][0] not in (t, t + 1):
                    raise NotALoop(f"step {where[user][0]} reads a value of step {t}: not a first-order recurrence")
    return check


def _check_leaf(t, k, i, la, lb, where, families, check: _Check) -> None:
    if not isinstance(lb, torch.fx.Node) or not isinstance(la, torch.fx.Node):
        if isinstance(la, torch.fx.Node) or isinstance(lb, torch.fx.Node) or not _same_constant(la, lb):
            step = [n for n, (s, _) in where.items() if s == 0]
            if _writes_in_place(step[k]):  # ``out[:, t] = h``: the write is what keeps it exact
                raise NotALoop(step_problems(step), settled=True)
            raise NotALoop(f"step {t} differs from step 0: a constant argument changes ({la!r} vs {lb!r})")
        return
    if lb in where:
        tb, kb = where[lb]
        if tb == t:
            if where.get(la) != (0, kb):
                raise NotALoop(f"step {t} is wired differently from step 0")
            return
        if tb == t - 1:
            if la in where:
                raise NotALoop("the first step reads a value of its own step where later steps read a carry")
            if check.carry_slots.setdefault((k, i), kb) != kb:
                raise NotALoop(f"step {t} reads another carried value than step 1")
            if check.init.setdefault(kb, la) is not la:
                raise NotALoop("two uses of one carry start from different values")
            return
        raise NotALoop(f"step {t} reads a value of step {tb}")
    fa, fb = families.get(la), families.get(lb)
    if fa is not None and fb is not None and fa.source in where and fb.source in where:
        # a slice of a value computed inside the step (``a, b = gates.chunk(2)``)
        if where[fa.source] != (0, where[fb.source][1]) or where[fb.source][0] != t:
            raise NotALoop(f"step {t} is wired differently from step 0")
        if _index_of(fa, la) != _index_of(fb, lb):
            raise NotALoop(f"step {t} takes another piece of a split value than step 0")
        return
    if la is lb:
        if (k, i) in check.carry_slots:
            raise NotALoop(f"step {t} reads an outside value where step 1 reads a carry")
        return
    family = families.get(lb)
    if family is not None and families.get(la) is family:
        index_a = _index_of(family, la)
        index_b = _index_of(family, lb)
        if t == 1:
            check.step_slots[(k, i)] = (family, index_b - index_a)
        if (k, i) not in check.step_slots:
            raise NotALoop(f"step {t} reads a step input where step 1 reads another value")
        stride = check.step_slots[(k, i)][1]
        if stride not in (1, -1) or index_b != index_a + t * stride:
            raise NotALoop(f"step {t} takes step input {family.source.name}[{index_b}]: not consecutive steps")
        return
    raise NotALoop(f"step {t} uses {lb.name} where step 0 uses {la.name}")


def _same_constant(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _index_of(family: StepInputFamily, node: torch.fx.Node) -> int:
    for index, member in family.members.items():
        if member is node:
            return index
    raise KeyError(node)


def _propose(anchors: list[tuple[int, int]]) -> tuple[int, int, list[int]]:
    """(first anchor position, step size, indices in step order) from ``anchors``, one
    ``(position, index)`` per step: where each step's first op is."""
    anchors = sorted(anchors)
    if len(anchors) < 2:
        raise NotALoop("fewer than two steps use the input")
    # The longest run of evenly spaced uses is the loop; a slice or two used before or
    # after it (``x[:, 0]`` as a start token, say) is ordinary outside code.
    gaps = [b[0] - a[0] for a, b in zip(anchors, anchors[1:])]
    best_start, best_length, start = 0, 1, 0
    for i in range(1, len(gaps) + 1):
        if i == len(gaps) or gaps[i] != gaps[start]:
            if i - start > best_length - 1:
                best_start, best_length = start, i - start + 1
            start = i
    if best_length < max(2, len(anchors) - 2):
        raise NotALoop(f"steps are not the same computation (their sizes differ: {sorted(set(gaps))} ops)")
    run = anchors[best_start : best_start + best_length]
    return run[0][0], gaps[best_start], [index for _, index in run]
def _carry_shape_problem(node: torch.fx.Node) -> str | None:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return f"carried value {node.name} is not a tensor"
    if value.dim() != 2 or not value.dtype.is_floating_point:
        return (
            f"carried value {node.name} has shape {tuple(value.shape)} and dtype {value.dtype}: only floating "
            "(batch, features) states are supported"
        )
    return None


def _layout_problem(carries: list[torch.fx.Node], step_families: list[StepInputFamily]) -> str | None:
    """λ acts on a state's last dim, so rows must be samples: every state's first dim is
    the batch, the leading dim of the per-step inputs.  A state kept as (features, batch)
    (``h = W @ h``) would get a λ over samples; it is left exact instead."""
    batches = [c.meta["example_value"].shape[0] for c in carries]
    for family in step_families:
        member = next(iter(family.members.values())).meta.get("example_value")
        if not isinstance(member, torch.Tensor):
            continue
        # the axes of size 1 a slice keeps in place of time: split/chunk's, ``x[:, t:t+1]``'s
        kept = {family.kept_time_axis()} | {i for i, e in enumerate(family.after) if e is None}
        shape = [n for i, n in enumerate(member.shape) if i not in kept]
        if shape:
            batches.append(shape[0])
    # sizes may be symbolic (a second batch size makes Dynamo trace it as a SymInt)
    if not all(statically_known_true(b == batches[0]) for b in batches[1:]):
        shapes = ", ".join(f"{c.name} {tuple(c.meta['example_value'].shape)}" for c in carries)
        return (f"the states ({shapes}) and the per-step inputs disagree on the batch size along their first "
                f"dim ({', '.join(map(str, batches))}): a (features, batch) layout?  λ acts on a state's last "
                "dim, so states must be (batch, features)")
    return None


def _score(segments, check: _Check) -> tuple[int, int]:
    """Fewer carries first; then prefer carries that the program uses after the loop."""
    carries = sorted(set(check.carry_slots.values()))
    inside = {node for seg in segments for node in seg}
    used_after = sum(1 for j in carries if any(u not in inside for u in segments[-1][j].users))
    return len(carries), -used_after


def _segmentations(calls, start: int, size: int, steps: int):
    """Candidate splits of the calls into steps, in groups: every phase of the proposed
    run of steps, then (if none of those is a loop) of the run without its first step,
    then without its last.  A slice used outside the loop can fall in step with it by
    chance (``alpha = start + x[0]`` before ``alpha = f(alpha) + x[t]`` for t ≥ 1: both
    uses are the last op of a stretch of the same length)."""
    runs = [(start, steps)] + ([(start + size, steps - 1), (start, steps - 1)] if steps > 2 else [])
    for first, count in runs:
        yield [[calls[first - phase + t * size : first - phase + (t + 1) * size] for t in range(count)]
               for phase in range(size) if first - phase >= 0 and first - phase + count * size <= len(calls)]


def _first_uses(node: torch.fx.Node, position: dict, families: dict, depth: int = 3) -> list[int]:
    """Positions of the calls that read ``node``, looking through slices of it that are
    slices themselves (``inputs[:, :, t:t+1][:, 0]``), which are not numbered calls."""
    found = []
    for user in node.users:
        if user in position:
            found.append(position[user])
        elif user in families and depth:
            found += _first_uses(user, position, families, depth - 1)
    return found


def _family_anchors(family: StepInputFamily, position: dict, families: dict, taken: set) -> list[tuple[int, int]]:
    """(position of its first use not yet part of a loop, index) of each member."""
    anchors = []
    for index, member in family.members.items():
        uses = [p for p in _first_uses(member, position, families) if p not in taken]
        if uses:
            anchors.append((min(uses), index))
    return anchors


def _repeated_ops(calls: list[torch.fx.Node], taken: set) -> list[list[tuple[int, int]]]:
    """Anchors of ops that Dynamo copied from one line of a loop (the same op, the same
    stack trace) at least twice, outside the loops found and refused: candidates for a
    loop that reads no per-step input."""
    groups: dict[tuple, list[int]] = {}
    for p, node in enumerate(calls):
        trace = node.meta.get("stack_trace")
        if trace and p not in taken:
            groups.setdefault((node.op, node.target, trace), []).append(p)
    return [[(p, i) for i, p in enumerate(positions)] for positions in groups.values() if len(positions) > 1]


@dataclass
class _Refusal:
    """A candidate loop that was not re-rolled: where its steps would be, and why not."""

    span: tuple[int, int]  # first and last position of the calls it covers
    what: str  # "" for a loop anchored on repeated ops: named after its first step
    step: list[torch.fx.Node]  # the calls of its first step (where the steps were found)
    reason: NotALoop


def _attempt(calls, position, anchors, families, taken) -> tuple[PythonLoop | None, NotALoop | None, tuple[int, int]]:
    """The loop whose steps start at ``anchors``, or why there is none; and the span of
    calls it was looked for in."""
    try:
        start, size, order = _propose(anchors)
    except NotALoop as reason:
        positions = [p for p, _ in anchors]
        return None, reason, (min(positions), max(positions))
    # from the first step's anchor to the last step's end: inside the loop, whatever the phase
    span = (start, min(len(calls) - 1, start + len(order) * size - 1))
    best, reasons = None, []
    for candidates in _segmentations(calls, start, size, len(order)):
        for segments in candidates:
            if any(position[n] in taken for seg in segments for n in seg):
                continue
            try:
                check = _check_segments(segments, families)
            except NotALoop as reason:
                reasons.append(reason)
                continue
            if not check.carry_slots:
                reasons.append(NotALoop("no value is carried from one step to the next"))
                continue
            carried = [segments[0][j] for j in set(check.carry_slots.values())]
            if any(not isinstance(n.meta.get("example_value"), torch.Tensor) for n in carried):
                # a cut between ``lstm_cell(...)`` and its ``h, c`` items carries the tuple:
                # another phase carries the tensors
                reasons.append(NotALoop(next(_carry_shape_problem(n) for n in carried
                                             if not isinstance(n.meta.get("example_value"), torch.Tensor))))
                continue
            if best is None or _score(segments, check) < _score(*best):
                best = (segments, check)
        if best is not None:
            break
    if best is None:
        settled = [r for r in reasons if r.settled]
        return None, (settled or reasons or [NotALoop("no segmentation of the steps fits")])[0], span
    try:
        segments, check, note = _peel_a_reshaping_first_step(*best, families)
        return _build(segments, check, families, note), None, span
    except NotALoop as reason:
        return None, reason, span
    except Exception as error:  # never fail compilation over a loop we cannot read: leave it exact
        return None, NotALoop(f"not understood ({type(error).__name__}: {error})", settled=True), span


def find_python_loops(gm: torch.fx.GraphModule) -> tuple[list[PythonLoop], list[LeftExact]]:
    """Every re-rollable Python loop in ``gm``, and one entry for each loop refused.

    Candidates are anchored on step-input families (each family tried again after every
    loop it yields: two loops, forwards and backwards over one ``x[t]``, read the same
    slices), then on ops repeated with one stack trace outside them (a loop that reads no
    per-step input, which is left exact).  Refusals whose steps overlap are one loop: the
    report names it once, with the reason of the candidate that was read as a loop if one
    was."""
    restore_unused_outputs(gm.graph)
    families = step_input_families(gm.graph)
    calls = [n for n in gm.graph.nodes if _is_call(n) and n not in families]
    position = {node: p for p, node in enumerate(calls)}
    loops: list[PythonLoop] = []
    refusals: list[_Refusal] = []
    taken: set[int] = set()  # positions of calls inside found loops

    def take(loop: PythonLoop) -> None:
        loops.append(loop)
        taken.update(position[n] for seg in loop.segments for n in seg)

    pending = list({id(f): f for f in families.values()}.values())
    progress = True
    while progress:
        progress = False
        for family in list(pending):
            anchors = _family_anchors(family, position, families, taken)
            if len(anchors) < 2:
                pending.remove(family)
                continue
            loop, reason, span = _attempt(calls, position, anchors, families, taken)
            if loop is not None:
                take(loop)
                progress = True
                continue
            pending.remove(family)
            if reason.settled or _looks_like_a_loop(family):
                refusals.append(_Refusal(span, f"loop over {user_name(family.source)}", _first_step(calls, anchors),
                                         reason))
    seen = {p for r in refusals for p in range(r.span[0], r.span[1] + 1)}
    for anchors in _repeated_ops(calls, taken | seen):
        if any(p in taken or p in seen for p, _ in anchors):
            continue
        loop, reason, span = _attempt(calls, position, anchors, families, taken)
        if loop is None and reason.settled:  # the same computation repeated, with carries: a loop
            refusals.append(_Refusal(span, "", _first_step(calls, anchors), reason))
        # (not settled: the ops repeat, the steps do not; neither is tried again by another op)
        seen.update(range(span[0], span[1] + 1))
    return loops, _one_entry_per_loop(refusals)


def _one_entry_per_loop(refusals: list[_Refusal]) -> list[LeftExact]:
    """Refusals whose spans overlap belong to one loop (a step input and the slices of a
    value inside its step, say): one entry each, named after the widest candidate, with
    the reason of one read as a loop (settled) if any."""
    groups: list[list[_Refusal]] = []
    for refusal in sorted(refusals, key=lambda r: r.span):
        if groups and refusal.span[0] <= max(r.span[1] for r in groups[-1]):
            groups[-1].append(refusal)
        else:
            groups.append([refusal])
    entries = []
    for group in groups:
        widest = max(group, key=lambda r: r.span[1] - r.span[0])
        reason = next((r.reason for r in group if r.reason.settled), widest.reason)
        what, source = describe_step(widest.step)
        entries.append(LeftExact(widest.what or what, source, str(reason)))
    return entries


def _first_step(calls: list[torch.fx.Node], anchors: list[tuple[int, int]]) -> list[torch.fx.Node]:
    """The calls from the first anchor to the second: one step, where anchors are steps."""
    first, second = sorted(p for p, _ in anchors)[:2]
    return calls[first : max(second, first + 1)]


def _looks_like_a_loop(family: StepInputFamily) -> bool:
    """Whether a refused family is worth reporting: every slice is consumed by the same
    kind of op, as the steps of one loop would be (two unrelated ``x[:, 0]`` and
    ``x[:, 1]`` are not)."""
    first_uses = set()
    for member in family.members.values():
        users = sorted(member.users, key=lambda u: u.name)
        first_uses.add(users[0].target if users else None)
    return len(first_uses) == 1 and None not in first_uses


def restore_unused_outputs(graph: torch.fx.Graph) -> None:
    """Give every multi-output call (``h, c = lstm_cell(...)``) a getitem for each output.

    Dynamo drops the getitem of an output nothing reads, which is the usual last step of a
    loop (the final ``c`` of an LSTMCell loop goes unused): that step then looks different
    from the others.  The restored getitems are dead code, removed again downstream.  They
    go where Dynamo puts them, each after the previous output's."""
    for node in list(graph.nodes):
        value = node.meta.get("example_value")
        if not _is_call(node) or _name(node) in _SEQUENCE_SPLITS or not isinstance(value, (tuple, list)):
            continue
        taken = {u.args[1]: u for u in node.users
                 if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)}
        if not taken:
            continue
        previous = node
        for index in range(len(value)):
            if index not in taken:
                with graph.inserting_after(previous):
                    taken[index] = graph.call_function(operator.getitem, (node, index))
                taken[index].meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
                taken[index].meta["example_value"] = value[index]
            previous = taken[index]


def is_identity_dropout(node: torch.fx.Node) -> bool:
    """Dropout that draws nothing: in eval mode, or with p = 0."""
    if "dropout" not in _name(node).lower():
        return False
    arguments = _dropout_arguments(node)
    return arguments is not None and (arguments[1] is False or arguments[0] == 0)


def _dropout_arguments(node: torch.fx.Node) -> tuple | None:
    """(p, training) of a dropout call (``F.dropout(x, p, training)``, ``torch.dropout(x, p,
    train)``), None where they are not constants."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    if isinstance(p, (int, float)) and isinstance(training, bool):
        return p, training
    return None


def random_op_problem(nodes) -> str | None:
    """Random ops in a step cannot be rewritten: the rolled forward and the batched
    recomputation would draw different masks, and the gradient would belong to neither.
    Dropout that draws nothing (eval mode, p = 0) is the identity."""
    for node in nodes:
        if is_identity_dropout(node):
            continue
        if any(word in _name(node).lower() for word in _RANDOM_OPS):
            return f"the step draws random numbers ({_name(node)}): the rewrite would not replay them"
    return None


def step_problems(nodes) -> str:
    """Everything in a step's ``nodes`` that keeps its loop exact, said at once ("" if nothing)."""
    inner = next((n for n in nodes if n.op == "call_function" and n.target in RECURRENT_OPS), None)
    # the batched step would vmap a whole recurrent op, which has no batching rule
    recurrent = inner and f"the step calls a recurrent module ({_name(inner)}): a loop around one is not re-rolled"
    found = [random_op_problem(nodes), mutation_problem(nodes), recurrent]
    return "; and ".join(problem for problem in found if problem)


# Python's augmented assignments on tensors (``g += ...``) and item assignment.
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}


def _writes_in_place(node: torch.fx.Node) -> bool:
    if not _is_call(node):
        return False
    if node.target in _INPLACE_OPERATORS:
        first = node.args[0] if node.args else None
        return isinstance(first, torch.fx.Node) and isinstance(first.meta.get("example_value"), torch.Tensor)
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return False  # operator.not_ / and_ (on sizes under dynamic shapes) are not in place
    name = _name(node)
    if name.endswith("_") and not name.startswith("_"):  # torch's naming of in-place ops
        return True
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function" and callable(node.target):
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):  # builtins without a signature, or not bindable
            return False
        return bound.arguments.get("inplace") is True
    return False


def mutation_problem(nodes) -> str | None:
    """A step that changes a tensor in place cannot be re-rolled from the graph: Dynamo's
    graph keeps the mutation as a node whose result later ops do not read (they read the
    mutated tensor by its old name), so the step body would silently lose it."""
    for node in nodes:
        if _writes_in_place(node):
            return (f"the step changes a tensor in place ({_name(node)}); write that line out of place "
                    "(e.g. `g = g + x` instead of `g += x` or `g.add_(x)`) for the loop to be rewritten")
    return None


def describe_step(step: list[torch.fx.Node]) -> tuple[str, str]:
    """A loop as a report names it, from the nodes of one of its steps: ``Python loop in
    'encoder.cell'`` (the innermost module every op of the step runs in) and the line
    that runs the step (their innermost common frame)."""
    paths = [module_path(n).split(".") for n in step if n.meta.get("nn_module_stack")]
    common = paths[0] if paths else []
    for p in paths[1:]:
        while common and p[: len(common)] != common:
            common = common[:-1]
    path = ".".join(common)
    return f"Python loop{' in ' + repr(path) if path else ''}", common_source(step)


def _carry_name(node: torch.fx.Node) -> str:
    """A carried value as the program names it: the name its line assigns it to, else
    Dynamo's name for it (which numbers each step's copy: ``h_3``)."""
    return assigned_name(node) or user_name(node)


def _same_shape(a, b) -> bool:
    return len(a.shape) == len(b.shape) and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _peel_a_reshaping_first_step(segments, check: _Check, families):
    """The loop without its first step if that step reads a carry of another shape than
    the step produces (``h`` starting as ``(1, B, H)``, each step returning ``(...).view(B, H)``):
    the steps are the same ops, but only the later ones compute on the carry's own shape,
    so the first runs as written and its new values start the loop.  (Reshaping the
    initial value instead would change what ops that name a dimension compute.)
    Returns ``(segments, check, note)``."""
    reshaped = []
    for j, init in check.init.items():
        before, after = init.meta.get("example_value"), segments[0][j].meta.get("example_value")
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and not _same_shape(before, after):
            reshaped.append(f"{_carry_name(segments[0][j])} {tuple(before.shape)} → {tuple(after.shape)}")
    if not reshaped:
        return segments, check, ""
    if len(segments) < 3:
        raise NotALoop(f"the first step reshapes the carried values ({', '.join(reshaped)}) and one step is left",
                       settled=True)
    note = (f"first step run as written, the loop from the second: it reshapes the initial values "
            f"({', '.join(reshaped)}); its gradient to them is exact")
    return segments[1:], _check_segments(segments[1:], families), note


def _build(segments, check: _Check, families, note: str = "") -> PythonLoop:
    carry_positions = sorted(set(check.carry_slots.values()))
    problem = step_problems(segments[0])
    if problem:
        raise NotALoop(problem, settled=True)
    for j in carry_positions:
        problem = _carry_shape_problem(segments[0][j])
        if problem:
            raise NotALoop(problem, settled=True)
    # slices of in-step values (``a, b = gates.chunk(2)``) belong to their step
    pieces = [u for seg in segments for n in seg for u in n.users if u in families and families[u].source is n]
    inside = {node for seg in segments for node in seg} | set(pieces)
    if any(u not in inside for p in pieces for u in p.users):
        raise NotALoop("a piece of a value computed inside the step is used after the loop", settled=True)
    first = segments[0]
    outside_users = [
        k for k in range(len(first)) if any(u not in inside for seg in segments for u in seg[k].users)
    ]
    epilogue_positions = [k for k in outside_users if k not in carry_positions]

    step_families: list[StepInputFamily] = []
    for family, _ in check.step_slots.values():
        if family not in step_families:
            step_families.append(family)
    invariants: list[torch.fx.Node] = []
    body, epilogue, epilogue_invariants = _extract_graphs(
        first, check, carry_positions, epilogue_positions, step_families, invariants, families
    )
    steps = len(segments)
    step_inputs = []
    strides = {s for _, s in check.step_slots.values()}
    if not strides:
        raise NotALoop("no per-step input: each step reads only values of the step before (a loop that feeds its "
                       "own output back, as generation does); loops over a sequence are rewritten", settled=True)
    if len(strides) != 1:
        raise NotALoop("the step reads one input forwards and another backwards in time", settled=True)
    reverse = strides.pop() < 0
    for family in step_families:
        stride = -1 if reverse else 1
        index0 = next(_index_of(family, la) for (k, i), (f, _) in check.step_slots.items() if f is family
                      for la in [_flat_args(first[k])[0][i]])
        step_inputs.append((family, [index0 + t * stride for t in range(steps)]))
    problem = _layout_problem([first[j] for j in carry_positions], step_families)
    if problem:
        raise NotALoop(problem, settled=True)
    what, source = describe_step(first)
    batch = segments[0][carry_positions[0]].meta["example_value"].shape[0]
    loop = LoopIR(
        name=f"{what} at {source}",
        body=body,
        carry_names=tuple(_carry_name(segments[0][j]) for j in carry_positions),
        carry_sizes=tuple(int(segments[0][j].meta["example_value"].shape[1]) for j in carry_positions),
        num_step_inputs=len(step_inputs),
        num_invariants=len(invariants),
        reverse=reverse,
        origin=what,
        source=source,
        length=steps,
        batch=batch,
        note=note,
    )
    return PythonLoop(
        loop=loop,
        segments=segments,
        pieces=pieces,
        step_inputs=step_inputs,
        init=[check.init[j] for j in carry_positions],
        invariants=invariants,
        carry_positions=carry_positions,
        epilogue=epilogue,
        epilogue_invariants=epilogue_invariants,
        epilogue_positions=epilogue_positions,
    )


def _extract_graphs(first, check: _Check, carry_positions, epilogue_positions, step_families, invariants, families):
    """The step body (carries only) and the epilogue (other per-step outputs) as FX graphs.

    Body placeholders: step inputs, previous carries, invariants.  Epilogue placeholders:
    step inputs, previous carries, new carries, invariants; it recomputes whatever
    intermediate values of the step it needs from those.
    """
    body, body_invariants = _step_graph(first, check, carry_positions, carry_positions, step_families, False, families)
    invariants.extend(body_invariants)
    epilogue, epilogue_invariants = None, []
    if epilogue_positions:
        epilogue, epilogue_invariants = _step_graph(
            first, check, epilogue_positions, carry_positions, step_families, True, families
        )
    return body, epilogue, epilogue_invariants


def _step_graph(first, check: _Check, outputs, carry_positions, step_families, new_carries_as_inputs, families):
    position = {node: k for k, node in enumerate(first)}
    given = set(carry_positions) if new_carries_as_inputs else set()
    needed = sorted(_ancestors(first, outputs, given, families))

    def kind_of(k, i, leaf):
        if (k, i) in check.carry_slots:
            return "prev", check.carry_slots[k, i]
        if (k, i) in check.step_slots:
            return "step", step_families.index(check.step_slots[k, i][0])
        if isinstance(leaf, torch.fx.Node):
            if leaf in position:
                return "internal", position[leaf]
            family = families.get(leaf)
            if family is not None and family.source in position:
                return "piece", (position[family.source], _index_of(family, leaf))
            return "invariant", leaf
        return "constant", leaf

    copied = [k for k in needed if k not in given]
    leaves = {k: [kind_of(k, i, leaf) for i, leaf in enumerate(_flat_args(first[k])[0])] for k in copied}
    invariant_nodes: list[torch.fx.Node] = []
    for k in copied:
        for kind, what in leaves[k]:
            if kind == "invariant" and what not in invariant_nodes and not _is_size(what):
                invariant_nodes.append(what)
    # where each size the step reads from outside (a symbolic batch size in ``.view(B, H)``)
    # is a dimension of one of its own tensors: read there, in the body, at every step
    tensors = [*((("prev", j), first[j]) for j in carry_positions), *((("internal", j), first[j]) for j in given),
               *((("step", i), next(iter(f.members.values()))) for i, f in enumerate(step_families)
                 if isinstance(f, StepInputFamily)),  # (a scan's step inputs are its placeholders)
               *((("invariant", node), node) for node in invariant_nodes)]

    graph = torch.fx.Graph()
    env: dict[tuple, torch.fx.Node] = {}
    for i in range(len(step_families)):
        env["step", i] = graph.placeholder(f"step_input_{i}")
    for j in carry_positions:
        env["prev", j] = graph.placeholder(f"prev_{first[j].name}")
    for j in sorted(given):
        env["internal", j] = graph.placeholder(f"new_{first[j].name}")
    for n, node in enumerate(invariant_nodes):
        env["invariant", node] = graph.placeholder(f"invariant_{n}")
    def lookup(kind, what):
        if kind == "constant":
            return what
        if kind == "invariant" and _is_size(what):
            if ("size", what) not in env:
                key, dim = _dimension_of(what, tensors)
                env["size", what] = graph.call_method("size", (env[key], dim))
            return env["size", what]
        if kind == "piece" and (kind, what) not in env:
            env[kind, what] = graph.call_function(operator.getitem, (env["internal", what[0]], what[1]))
        return env[kind, what]

    for k in copied:
        spec = _flat_args(first[k])[1]
        values = [lookup(kind, what) for kind, what in leaves[k]]
        args, kwargs = spec.unflatten(values)
        if first[k].target is operator.getitem and isinstance(args[0], (tuple, list)):
            # ``h, c = lstm_cell(...)``: the inlined cell's own values, not ops on a tuple
            env["internal", k] = args[0][args[1]]
        elif is_identity_dropout(first[k]):  # eval mode or p = 0: its input, and nothing to replay
            env["internal", k] = args[0] if args else kwargs["input"]
        elif first[k].op == "call_method":
            env["internal", k] = graph.call_method(first[k].target, tuple(args), dict(kwargs))
        elif first[k].target in DECOMPOSED_CELL_OPS:
            env["internal", k] = _inline_cell(graph, first[k].target, args, kwargs)
        else:
            env["internal", k] = graph.call_function(first[k].target, tuple(args), dict(kwargs))
    graph.output(tuple(env["internal", k] for k in outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph), invariant_nodes


def _is_size(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), torch.SymInt)


def _dimension_of(size: torch.fx.Node, tensors: list[tuple[tuple, torch.fx.Node]]) -> tuple[tuple, int]:
    """(where in the body, dim) of a tensor of the step whose dimension ``dim`` is ``size``."""
    symbol = size.meta["example_value"].node.expr
    for key, node in tensors:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for dim, extent in enumerate(value.shape):
                if isinstance(extent, torch.SymInt) and extent.node.expr == symbol:
                    return key, dim
    raise NotALoop(f"the step reads a size ({size.name}) that none of its tensors has as a dimension", settled=True)


@functools.cache
def _traced_cell(op) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(DECOMPOSED_CELL_OPS[op])


def _inline_cell(graph: torch.fx.Graph, op, args, kwargs):
    """A fused cell op written out in plain ops: vmappable, and its input projection can
    be hoisted out of the rolled forward like any other input-only work."""
    traced = _traced_cell(op)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    values = list(args) + [kwargs.get(p.target) for p in placeholders[len(args) :]]
    copied = dict(zip(placeholders, values))
    result = graph.graph_copy(traced.graph, copied)
    # ``hx[1]`` of an LSTM cell's ``(h, c)`` argument: the carry itself, not an op on a
    # tuple (which no later pass, the highway path's above all, would see through)
    for node in copied.values():
        if (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], (tuple, list)) and isinstance(node.args[1], int)):
            node.replace_all_uses_with(node.args[0][node.args[1]])
            graph.erase_node(node)
    return result


def _ancestors(first: list[torch.fx.Node], outputs: list[int], stop: set[int], families) -> set[int]:
    """Positions in the step that ``outputs`` depend on, not looking past ``stop``."""
    position = {node: k for k, node in enumerate(first)}
    needed: set[int] = set()
    todo = list(outputs)
    while todo:
        k = todo.pop()
        if k in needed:
            continue
        needed.add(k)
        if k in stop:
            continue
        for leaf in _flat_args(first[k])[0]:
            if isinstance(leaf, torch.fx.Node) and leaf not in position and leaf in families:
                leaf = families[leaf].source
            if isinstance(leaf, torch.fx.Node) and leaf in position:
                todo.append(position[leaf])
    return needed
