"""All-or-none, checked on random transactions over the simulated block layer.

After every run: committed => the world is the expected world; rolled back or
invalid => the world is the initial world; needs recovery => the report names
exactly what differs from the initial world (or exactly the pending finalize
steps of a committed run). Cancels run in reverse order of the actions.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from blktx import ActionSpec, Event, Executor, Transaction, hookimpl
from blktx.plugins import load
from blktx.result import COMMITTED, INVALID, NEEDS_RECOVERY, ROLLED_BACK
from blktx.testing.strategies import sim_transactions, sim_worlds
from blktx_plugins.sim import make_world, read_world


class Observer:
    def __init__(self) -> None:
        self.cancelled: list[int] = []

    @hookimpl
    def blktx_event(self, event: Event) -> None:
        if event.kind == "action" and event.phase == "cancel" and event.action is not None:
            self.cancelled.append(event.action)


OBSERVER = Observer()
REGISTRY = load(extra=[("test-observer", OBSERVER)])


def normal(world: dict[str, Any]) -> dict[str, Any]:
    """A world up to snapshot ids: names as a multiset, layers, active layer."""
    return {d: (sorted(Counter(v["snapshots"].values()).items()), v["layers"], v["active"]) for d, v in world["devices"].items()}


def expected(initial: dict[str, Any], actions: list[tuple[str, dict[str, Any]]], skip: set[int]) -> dict[str, Any]:
    world = copy.deepcopy(initial)
    for i, (kind, p) in enumerate(actions):
        dev = world["devices"].get(p.get("device", ""))
        if kind == "sim.snapshot":
            dev["snapshots"][f"new{i}"] = p["name"]
        elif kind == "sim.overlay":
            dev["layers"].append(p["layer"])
            dev["active"] = p["layer"]
    for i, (kind, p) in enumerate(actions):
        if kind == "sim.delete" and i not in skip:
            dev = world["devices"][p["device"]]
            sid = min((s for s, n in dev["snapshots"].items() if n == p["name"] and not s.startswith("new")), key=int)
            del dev["snapshots"][sid]
    return world


def differences(initial: dict[str, Any], world: dict[str, Any], wpath: str) -> set[tuple[str, str]]:
    found = set()
    for d, dev in world["devices"].items():
        before = initial["devices"][d]
        target = f"sim:{wpath}#{d}"
        for sid, name in dev["snapshots"].items():
            if before["snapshots"].get(sid) != name:
                found.add((target, f"snapshot {name!r} (id {sid})"))
        for layer in dev["layers"]:
            if layer not in before["layers"]:
                found.add((target, f"layer {layer!r}"))
        if dev["active"] != before["active"]:
            found.add((target, f"active layer switched to {dev['active']!r}"))
    return found


def run_case(world: dict[str, Any], actions: list[tuple[str, dict[str, Any]]], jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wpath = str(Path(tmp) / "sim-world.json")
        make_world(wpath, world["devices"])
        initial = read_world(wpath)
        tx = Transaction(
            [ActionSpec(t, dict(p)) for t, p in actions],
            base_dir=tmp,
            options={"jobs": jobs, "finalize_retries": 1, "retry_delay": 0.0, "cancel_retries": 0},
        )
        OBSERVER.cancelled.clear()
        result = Executor(REGISTRY).run(tx)
        after = read_world(wpath)
        if result.outcome == INVALID:
            # only a check-phase fault or a conflict may refuse these transactions
            assert all(
                p.message in ("fault injected", "the transaction has no actions") or "conflicts with" in p.message
                for p in result.problems
            )
            assert (
                any(p.get("phase") == "check" for _, p in actions)
                or any("conflicts" in p.message for p in result.problems)
                or not actions
            )
        if result.outcome in (INVALID, ROLLED_BACK):
            assert after == initial, result.summary()
            assert not result.leftovers
        elif result.outcome == COMMITTED:
            assert normal(after) == normal(expected(initial, actions, set())), result.summary()
            assert all(a.state == "INVALIDATED" for a in result.actions)
        else:
            assert result.outcome == NEEDS_RECOVERY
            if result.committed:
                pending = {p.action for p in result.pending}
                assert pending and not result.leftovers
                assert normal(after) == normal(expected(initial, actions, pending))
                assert all(actions[i][1].get("fail") == "finalize" for i in pending)
            else:
                assert result.leftovers, result.summary()
                reported = {(lo.target, lo.what) for lo in result.leftovers}
                assert reported == differences(initial, after, wpath)
        if not result.committed and result.outcome != INVALID:
            assert result.failure is not None and result.failure.action is not None
            # every action that did anything was cancelled, newest first
            live = [
                a.index for a in result.actions if not a.type.finalize and (a.state == "CANCELED" or a.failed_phase == "cancel")
            ]
            assert sorted(live) == sorted(
                set(OBSERVER.cancelled) | {a.index for a in result.actions if a.failed_phase == "cancel"}
            )
            if jobs == 1:
                assert OBSERVER.cancelled == sorted(OBSERVER.cancelled, reverse=True)
            assert all(a.state in ("START", "CANCELED") or a.failed_phase == "cancel" for a in result.actions)


@st.composite
def cases(draw: Any) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    devices = draw(sim_worlds())
    return {"devices": devices}, draw(sim_transactions(devices))


@given(cases())
def test_all_or_none_serial(case: tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]) -> None:
    run_case(case[0], case[1], jobs=1)


@given(cases())
def test_all_or_none_parallel(case: tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]) -> None:
    run_case(case[0], case[1], jobs=3)
