"""What the passes found and did: the object behind :func:`dsf_compile.explain`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from .loop_ir import LeftExact


@dataclass
class LoopReport:
    """One loop found in a compiled graph and the rewrite applied to it."""

    name: str
    origin: str
    source: str
    length: str
    batch: str
    state_size: int
    direction: str
    carries: str
    feedback: str
    rewrite: str
    note: str = ""


@dataclass
class Report:
    """Loops found (``.loops``) and things left exact (``.left_exact``), over all graphs;
    ``.eager_calls``: calls that ran without any compiled graph (exact gradients), and why."""

    loops: list[LoopReport] = field(default_factory=list)
    left_exact: list[LeftExact] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    eager_calls: list[str] = field(default_factory=list)
    traced: bool = True  # False: the model has not been called since it was applied

    def __str__(self) -> str:
        if not self.traced:
            return ("not traced yet: the model has not been called since dsf_compile.apply; report() lists what "
                    "its calls compile (dsf_compile.explain(model, *inputs) tells beforehand)")
        parts = []
        if self.loops:
            rows = [
                [r.name, r.source, r.length, r.batch, r.state_size, r.direction, r.carries, r.feedback, r.rewrite]
                for r in self.loops
            ]
            headers = ["loop", "source", "T", "B", "state", "direction", "carries", "λ", "rewrite"]
            if any(r.note for r in self.loops):
                rows = [[*row, r.note] for row, r in zip(rows, self.loops)]
                headers.append("note")
            parts.append(f"{len(self.loops)} recurrent loop(s):\n" + tabulate(rows, headers=headers))
        else:
            parts.append("no recurrent loop rewritten: every gradient stays exact" if self.left_exact
                         else "no recurrent loop found: every gradient stays exact")
        if self.left_exact:
            rows = [[e.what, e.source, e.reason] for e in self.left_exact]
            parts.append("left exact:\n" + tabulate(rows, headers=["what", "source", "why"]))
        if self.graph_breaks:
            reasons = "\n".join(f"  - {reason}" for reason in self.graph_breaks)
            parts.append(
                "graph breaks (code outside the compiled graphs runs eagerly, with exact gradients):\n" + reasons
            )
        if self.eager_calls:
            reasons = "\n".join(f"  - {reason}" for reason in self.eager_calls)
            parts.append("calls run eagerly, every loop with exact gradients:\n" + reasons)
        return "\n\n".join(parts)
