from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from transitions import MachineError

from blktx.plugins import default_registry
from blktx.states import CORE_TRANSITIONS, Lifecycle, Transition

TYPES = sorted(default_registry().types)


def test_core_lifecycle_is_well_formed() -> None:
    assert Lifecycle().problems() == []


def test_a_lifecycle_missing_a_core_transition_is_reported() -> None:
    broken = Lifecycle(transitions=tuple(t for t in CORE_TRANSITIONS if t.source != "INVALIDATED"))
    assert any("INVALIDATED -> CANCELED" in p for p in broken.problems())


def test_a_transition_to_an_unknown_state_is_reported() -> None:
    broken = Lifecycle(transitions=(*CORE_TRANSITIONS, Transition("pivot", "CREATED", "PIVOTED")))
    assert broken.problems() == ["transition pivot names unknown state PIVOTED"]


def test_mermaid_is_generated_from_the_table() -> None:
    text = Lifecycle().mermaid("x")
    for t in CORE_TRANSITIONS:
        assert f"{t.source} --> {t.dest}: {t.trigger}" in text
    assert text.count("-->") == len(CORE_TRANSITIONS) + 1


def test_one_machine_per_type_shared_by_every_action() -> None:
    registry = default_registry()
    for name in TYPES:
        cls = registry.types[name].cls
        assert cls.lifecycle.machine is cls.lifecycle.machine
        assert not any(e.startswith("to_") for e in cls.lifecycle.machine.events), "auto transitions are off"


class _Model:
    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = "START"


class MachineBehaviour(RuleBasedStateMachine):
    """Each type's machine accepts exactly the transitions its lifecycle declares."""

    @initialize(name=st.sampled_from(TYPES))
    def pick(self, name: str) -> None:
        self.lifecycle = default_registry().types[name].cls.lifecycle
        self.model = _Model()

    @rule(trigger=st.sampled_from(["do", "invalidate", "cancel", "finalize", "pivot"]))
    def fire(self, trigger: str) -> None:
        before = self.model.state
        allowed = {t.dest for t in self.lifecycle.transitions if t.trigger == trigger and t.source == before}
        event = self.lifecycle.machine.events.get(trigger)
        if not allowed:
            assert not self.lifecycle.allowed(trigger, before)
            if event is not None:
                with pytest.raises(MachineError):
                    event.trigger(self.model)
            assert self.model.state == before
        else:
            assert self.lifecycle.allowed(trigger, before)
            assert event is not None and event.trigger(self.model)
            assert self.model.state in allowed


TestMachineBehaviour = MachineBehaviour.TestCase
