"""Both lifecycles, declared as data: the action's and the transaction's.

Every action type's ``transitions`` machine, the transaction's machine, ``blktx
graph`` and the diagrams in the docs are generated from the tables below; change a
lifecycle here and nowhere else. A step is legal exactly when its machine has the
transition: :meth:`Lifecycle.next` answers from the machine's own event table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from transitions import Machine

# -- the action lifecycle ---------------------------------------------------------------

START = "START"
DOING = "DOING"
CREATED = "CREATED"
INVALIDATED = "INVALIDATED"
CANCEL_FAILED = "CANCEL_FAILED"
CANCELED = "CANCELED"

#: The states every action type has. Types may add internal states, never remove these.
CORE_STATES: tuple[str, ...] = (START, DOING, CREATED, INVALIDATED, CANCEL_FAILED, CANCELED)

#: States from which a roll back must cancel an action: its do may have run.
LIVE_STATES: frozenset[str] = frozenset({DOING, CREATED, INVALIDATED, CANCEL_FAILED})


@dataclass(frozen=True)
class Transition:
    """One allowed step of a machine: ``trigger`` moves ``source`` to ``dest``."""

    trigger: str
    source: str
    dest: str
    why: str = ""


CORE_TRANSITIONS: tuple[Transition, ...] = (
    Transition("begin", START, DOING, "the intent is durable: do may run (and may be killed half-way)"),
    Transition("do", DOING, CREATED, "make the new thing; nobody uses it yet"),
    Transition("invalidate", CREATED, INVALIDATED, "switch the users over to it"),
    Transition("cancel", START, CANCELED, "never began: nothing to undo"),
    Transition("cancel", DOING, CANCELED, "undo a do that may have run half-way"),
    Transition("cancel", CREATED, CANCELED, "remove what do made"),
    Transition("cancel", INVALIDATED, CANCELED, "switch the users back, then remove"),
    Transition("cancel", CANCEL_FAILED, CANCELED, "a retry (or blktx recover) finished the cancel"),
    Transition("cancel", CANCELED, CANCELED, "cancel is idempotent: a retry is allowed"),
    Transition("cancel_failed", START, CANCEL_FAILED, "the cancel raised: what is left is reported"),
    Transition("cancel_failed", DOING, CANCEL_FAILED, "the cancel raised: what is left is reported"),
    Transition("cancel_failed", CREATED, CANCEL_FAILED, "the cancel raised: what is left is reported"),
    Transition("cancel_failed", INVALIDATED, CANCEL_FAILED, "the cancel raised: what is left is reported"),
    Transition("cancel_failed", CANCELED, CANCEL_FAILED, "a repeated cancel raised: it was not idempotent"),
    Transition("cancel_failed", CANCEL_FAILED, CANCEL_FAILED, "a retry failed again"),
)


def _machine(states: tuple[str, ...], transitions: tuple[Transition, ...]) -> Machine:
    return Machine(
        model=None,
        states=list(states),
        initial=None,
        auto_transitions=False,
        transitions=[{"trigger": t.trigger, "source": t.source, "dest": t.dest} for t in transitions],
    )


def _table(machine: Machine) -> dict[tuple[str, str], str]:
    """(trigger, source) -> dest, read back from the built machine's events."""
    table: dict[tuple[str, str], str] = {}
    for trigger, event in machine.events.items():
        for source, moves in event.transitions.items():
            table[(trigger, source)] = str(moves[0].dest)
    return table


def _mermaid(initial: str, transitions: tuple[Transition, ...], title: str, finals: tuple[str, ...] = ()) -> str:
    lines = [f"---\ntitle: {title}\n---"] if title else []
    lines += ["stateDiagram-v2", f"    [*] --> {initial}"]
    lines += [f"    {t.source} --> {t.dest}: {t.trigger}" for t in transitions]
    lines += [f"    {s} --> [*]" for s in finals]
    return "\n".join(lines) + "\n"


class IllegalStep(RuntimeError):
    """A step its machine does not allow from the current state: a bug, raised before any side effect."""


@dataclass(frozen=True)
class Lifecycle:
    """States and transitions of one action type; the default is the core lifecycle."""

    states: tuple[str, ...] = CORE_STATES
    transitions: tuple[Transition, ...] = CORE_TRANSITIONS
    _built: list[tuple[Machine, dict[tuple[str, str], str]]] = field(default_factory=list, repr=False, compare=False)

    def problems(self) -> list[str]:
        """What makes this lifecycle unusable; empty when it is well formed."""
        found: list[str] = []
        known = set(self.states)
        for state in CORE_STATES:
            if state not in known:
                found.append(f"core state {state} is missing")
        if len(known) != len(self.states):
            found.append("a state is listed twice")
        pairs = {(t.trigger, t.source, t.dest) for t in self.transitions}
        for t in CORE_TRANSITIONS:
            if (t.trigger, t.source, t.dest) not in pairs:
                found.append(f"core transition {t.trigger}: {t.source} -> {t.dest} is missing")
        for t in self.transitions:
            for end in (t.source, t.dest):
                if end not in known:
                    found.append(f"transition {t.trigger} names unknown state {end}")
        return found

    def _build(self) -> tuple[Machine, dict[tuple[str, str], str]]:
        if not self._built:
            machine = _machine(self.states, self.transitions)
            self._built.append((machine, _table(machine)))
        return self._built[0]

    @property
    def machine(self) -> Machine:
        """The one ``transitions`` machine shared by every action of a type.

        Built on first use with ``model=None`` (the "static machine" pattern): actions
        are never added as models; the executor asks it where each step leads.
        """
        return self._build()[0]

    def allowed(self, trigger: str, state: str) -> bool:
        return (trigger, state) in self._build()[1]

    def next(self, trigger: str, state: str) -> str:
        """Where ``trigger`` leads from ``state``; :class:`IllegalStep` if the machine has no such step."""
        try:
            return self._build()[1][(trigger, state)]
        except KeyError:
            raise IllegalStep(f"{trigger} is not allowed from {state}") from None

    def mermaid(self, title: str = "") -> str:
        """The lifecycle as a Mermaid ``stateDiagram-v2``."""
        return _mermaid(START, self.transitions, title)

    def as_dict(self) -> dict[str, Any]:
        return {
            "states": list(self.states),
            "transitions": [{"trigger": t.trigger, "source": t.source, "dest": t.dest, "why": t.why} for t in self.transitions],
        }


# -- the transaction lifecycle ----------------------------------------------------------


class TxState(StrEnum):
    """Where a transaction is. The journal stores these; every outcome, word and exit
    status derives from them (:mod:`blktx.status`)."""

    NEW = "NEW"
    LOCKED = "LOCKED"
    CHECKED = "CHECKED"
    INVALID = "INVALID"
    RUNNING = "RUNNING"
    ROLLING_BACK = "ROLLING_BACK"
    ABORTED = "ABORTED"
    ROLLBACK_INCOMPLETE = "ROLLBACK_INCOMPLETE"
    COMMITTED = "COMMITTED"
    FINALIZING = "FINALIZING"
    DONE = "DONE"
    FINALIZE_INCOMPLETE = "FINALIZE_INCOMPLETE"


_T = TxState
TX_TRANSITIONS: tuple[Transition, ...] = (
    Transition("lock", _T.NEW, _T.LOCKED, "every target locked and claimed, before any check"),
    Transition("refuse", _T.NEW, _T.INVALID, "the spec, a lock or the journal refused; nothing touched"),
    Transition("refuse", _T.LOCKED, _T.INVALID, "a check refused; nothing touched; locks released"),
    Transition("pass", _T.LOCKED, _T.CHECKED, "every check passed, under the locks"),
    Transition("refuse", _T.CHECKED, _T.INVALID, "the journal refused BEGIN; nothing touched"),
    Transition("interrupt", _T.NEW, _T.ABORTED, "a signal or a request before anything was touched"),
    Transition("interrupt", _T.LOCKED, _T.ABORTED, "a signal or a request during the checks"),
    Transition("interrupt", _T.CHECKED, _T.ABORTED, "a signal or a request before BEGIN"),
    Transition("begin", _T.CHECKED, _T.RUNNING, "BEGIN is durable: side effects may start"),
    Transition("commit", _T.RUNNING, _T.COMMITTED, "COMMITTED is durable: the commit point"),
    Transition("fail", _T.RUNNING, _T.ROLLING_BACK, "a step failed, an interrupt, or the commit write failed"),
    Transition("abort", _T.ROLLING_BACK, _T.ABORTED, "every started action cancelled, every hold resumed"),
    Transition("stuck", _T.ROLLING_BACK, _T.ROLLBACK_INCOMPLETE, "a cancel or a resume failed: locks stay"),
    Transition("finalize", _T.COMMITTED, _T.FINALIZING, "holds resumed; finalize and finish steps roll forward"),
    Transition("finish", _T.FINALIZING, _T.DONE, "every finalize and finish step took effect"),
    Transition("stuck", _T.FINALIZING, _T.FINALIZE_INCOMPLETE, "a step is pending or a hold not resumed: locks stay"),
    Transition("recover", _T.RUNNING, _T.ROLLING_BACK, "blktx recover: the run died before its commit point"),
    Transition("recover", _T.ROLLING_BACK, _T.ROLLING_BACK, "blktx recover: the run died while rolling back"),
    Transition("recover", _T.ROLLBACK_INCOMPLETE, _T.ROLLING_BACK, "blktx recover retries what was left"),
    Transition("recover", _T.COMMITTED, _T.FINALIZING, "blktx recover: the run died after its commit point"),
    Transition("recover", _T.FINALIZING, _T.FINALIZING, "blktx recover: the run died while finalizing"),
    Transition("recover", _T.FINALIZE_INCOMPLETE, _T.FINALIZING, "blktx recover retries what is pending"),
    Transition("forget", _T.ROLLBACK_INCOMPLETE, _T.ABORTED, "blktx recover --forget: a person settled what was left"),
    Transition("forget", _T.FINALIZE_INCOMPLETE, _T.DONE, "blktx recover --forget: a person finished what was pending"),
)
del _T

#: States in which a transaction is over: its locks and claims are released.
TX_FINAL: frozenset[TxState] = frozenset({TxState.INVALID, TxState.ABORTED, TxState.DONE})


class TxLifecycle:
    """The transaction's machine: built once, shared by every run."""

    transitions = TX_TRANSITIONS
    _built: tuple[Machine, dict[tuple[str, str], str]] | None = None

    @classmethod
    def _build(cls) -> tuple[Machine, dict[tuple[str, str], str]]:
        if cls._built is None:
            machine = _machine(tuple(TxState), TX_TRANSITIONS)
            cls._built = (machine, _table(machine))
        return cls._built

    @classmethod
    def machine(cls) -> Machine:
        return cls._build()[0]

    @classmethod
    def allowed(cls, trigger: str, state: TxState) -> bool:
        return (trigger, state.value) in cls._build()[1]

    @classmethod
    def next(cls, trigger: str, state: TxState) -> TxState:
        try:
            return TxState(cls._build()[1][(trigger, state.value)])
        except KeyError:
            raise IllegalStep(f"transaction: {trigger} is not allowed from {state}") from None

    @classmethod
    def mermaid(cls, title: str = "transaction") -> str:
        return _mermaid(TxState.NEW, TX_TRANSITIONS, title, tuple(sorted(TX_FINAL)))

    @classmethod
    def as_dict(cls) -> dict[str, Any]:
        return {
            "states": [s.value for s in TxState],
            "final": sorted(s.value for s in TX_FINAL),
            "transitions": [
                {"trigger": t.trigger, "source": str(t.source), "dest": str(t.dest), "why": t.why} for t in TX_TRANSITIONS
            ],
        }
