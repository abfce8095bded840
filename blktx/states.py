"""The action lifecycle, declared as data.

Every action type's ``transitions`` machine, ``blktx graph`` and the diagrams in
the docs are generated from the tables below; change the lifecycle here and
nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transitions import Machine

START = "START"
CREATED = "CREATED"
INVALIDATED = "INVALIDATED"
CANCELED = "CANCELED"

#: The states every action type has. Types may add internal states, never remove these.
CORE_STATES: tuple[str, ...] = (START, CREATED, INVALIDATED, CANCELED)

#: States from which the executor must cancel an action when rolling back.
LIVE_STATES: frozenset[str] = frozenset({CREATED, INVALIDATED})


@dataclass(frozen=True)
class Transition:
    """One allowed step of an action's machine: ``trigger`` moves ``source`` to ``dest``."""

    trigger: str
    source: str
    dest: str
    why: str = ""


CORE_TRANSITIONS: tuple[Transition, ...] = (
    Transition("do", START, CREATED, "make the new thing; nobody uses it yet"),
    Transition("invalidate", CREATED, INVALIDATED, "switch the users over to it"),
    Transition("cancel", START, CANCELED, "undo a do that may have run half-way"),
    Transition("cancel", CREATED, CANCELED, "remove what do made"),
    Transition("cancel", INVALIDATED, CANCELED, "switch the users back, then remove"),
    Transition("cancel", CANCELED, CANCELED, "cancel is idempotent: a retry is allowed"),
)

# Transaction outcomes as the executor reports them to the journal.
TX_COMMITTED = "COMMITTED"
TX_ABORTED = "ABORTED"
TX_DONE = "DONE"


@dataclass(frozen=True)
class Lifecycle:
    """States and transitions of one action type; the default is the core lifecycle."""

    states: tuple[str, ...] = CORE_STATES
    transitions: tuple[Transition, ...] = CORE_TRANSITIONS
    _machine: list[Machine] = field(default_factory=list, repr=False, compare=False)

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

    @property
    def machine(self) -> Machine:
        """The one ``transitions`` machine shared by every action of a type.

        Built on first use with ``model=None`` (the "static machine" pattern): actions
        are never added as models; the executor triggers events for each one.
        """
        if not self._machine:
            self._machine.append(
                Machine(
                    model=None,
                    states=list(self.states),
                    transitions=[
                        {"trigger": t.trigger, "source": t.source, "dest": t.dest}
                        for t in self.transitions
                    ],
                    initial=None,
                    auto_transitions=False,
                )
            )
        return self._machine[0]

    def allowed(self, trigger: str, state: str) -> bool:
        event = self.machine.events.get(trigger)
        return event is not None and state in event.transitions

    def mermaid(self, title: str = "") -> str:
        """The lifecycle as a Mermaid ``stateDiagram-v2``."""
        lines = ["stateDiagram-v2"]
        if title:
            lines.insert(0, f"---\ntitle: {title}\n---")
        lines.append(f"    [*] --> {START}")
        for t in self.transitions:
            lines.append(f"    {t.source} --> {t.dest}: {t.trigger}")
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "states": list(self.states),
            "transitions": [
                {"trigger": t.trigger, "source": t.source, "dest": t.dest, "why": t.why}
                for t in self.transitions
            ],
        }
