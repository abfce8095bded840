"""What a run reports: the outcome, every action's state, what failed, what is left."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blktx.actiontype import Action, Leftover
from blktx.errors import Problem
from blktx.events import Hold
from blktx.states import TxState
from blktx.status import CHECKED, COMMITTED, INVALID, NEEDS_RECOVERY, ROLLED_BACK, status

__all__ = ["CHECKED", "COMMITTED", "INVALID", "NEEDS_RECOVERY", "ROLLED_BACK", "Failure", "Result"]


@dataclass(frozen=True)
class Failure:
    """The step that made a run roll back: which action, in which phase, and why."""

    phase: str
    message: str
    action: int | None = None
    type: str | None = None
    target: str | None = None

    def __str__(self) -> str:
        who = f"action #{self.action} ({self.type}) on {self.target}" if self.action is not None else "the run"
        return f"{who} failed in {self.phase}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Result:
    """The outcome of ``check`` or ``run``: the transaction's state, and all that
    derives from it (:mod:`blktx.status`).

    ``committed`` tells whether the commit point was reached: a committed run whose
    finalize steps are still pending has outcome ``needs recovery`` and
    ``committed`` True.
    """

    txid: str
    state: TxState
    actions: list[Action] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    failure: Failure | None = None
    failures: list[Failure] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    pending: list[Failure] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    checked_only: bool = False
    description: str = ""
    #: The proof of the cut: whether every member was taken inside the common quiesce window.
    cut: dict[str, Any] | None = None

    @property
    def outcome(self) -> str:
        return status(self.state).outcome

    @property
    def committed(self) -> bool:
        return status(self.state).committed

    @property
    def exit_status(self) -> int:
        return status(self.state).exit_status

    def summary(self) -> str:
        if self.outcome == INVALID:
            return f"invalid: {len(self.problems)} problem(s); nothing was touched"
        if self.outcome == CHECKED:
            return f"check passed: {len(self.actions)} action(s) would run; nothing was touched"
        if self.outcome == COMMITTED:
            return f"committed: {len(self.actions)} action(s) in {self.seconds:.3f}s"
        if self.outcome == ROLLED_BACK:
            return f"rolled back: {self.failure}; nothing changed"
        if self.outcome != NEEDS_RECOVERY:
            return status(self.state).words
        parts = []
        if self.leftovers:
            parts.append(f"{len(self.leftovers)} thing(s) left behind by failed cancels")
        if self.pending:
            parts.append(f"{len(self.pending)} finalize step(s) pending")
        state = "committed" if self.committed else "rolled back"
        return f"needs recovery ({state}): " + ", ".join(parts or ["interrupted"]) + "; run `blktx recover`"

    def to_json(self) -> dict[str, Any]:
        """The whole report as one dict; ``actions`` is its last key."""
        return {**self.json_head(), "actions": [action_json(a) for a in self.actions]}

    def json_head(self) -> dict[str, Any]:
        """Every field of :meth:`to_json` but ``actions``, in the same order: a
        printer writes this, then the actions one at a time (:func:`action_json`),
        and never holds the whole report of a 100,000-action run."""
        return {
            "txid": self.txid,
            "outcome": self.outcome,
            "state": self.state.value,
            "exit_status": self.exit_status,
            "committed": self.committed,
            "checked_only": self.checked_only,
            "description": self.description,
            "cut": self.cut,
            "summary": self.summary(),
            "seconds": round(self.seconds, 6),
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
            "problems": [p.to_json() for p in self.problems],
            "failure": self.failure.to_json() if self.failure else None,
            "failures": [f.to_json() for f in self.failures],
            "leftovers": [{"target": lo.target, "what": lo.what, "why": lo.why} for lo in self.leftovers],
            "pending": [f.to_json() for f in self.pending],
            "holds": [{"kind": h.kind, "target": h.target, "window": h.window} for h in self.holds],
            "warnings": self.warnings,
        }


def action_json(a: Action) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": a.index,
        "type": a.type.name,
        "target": a.target,
        "state": a.state,
    }
    if a.error is not None:
        out["error"] = a.error
        out["failed_phase"] = a.failed_phase
    if a.durations:
        out["durations"] = {k: round(v, 6) for k, v in a.durations.items()}
    if a.output:
        out["output"] = a.output
    return out
