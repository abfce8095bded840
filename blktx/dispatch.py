"""Run one step over units, one after another or in a thread pool: the one place
that knows ``jobs``; and how a phase's actions make units."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from blktx.actiontype import Action, ActionType
from blktx.states import START

U = TypeVar("U")


def dispatch(
    units: Sequence[U], work: Callable[[U], None], jobs: int, stop: Callable[[], bool] = lambda: False, name: str = "blktx"
) -> None:
    """Call ``work`` on every unit: serially when ``jobs`` <= 1 (stopping as soon as
    ``stop()`` says so), else up to ``jobs`` at once (every unit runs: units are
    independent, and a phase is judged as a whole)."""
    if jobs <= 1 or len(units) <= 1:
        for unit in units:
            work(unit)
            if stop():
                return
        return
    from concurrent.futures import ThreadPoolExecutor  # not imported by a serial run

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix=name) as pool:
        list(pool.map(work, units))


def begin_all(actions: Sequence[Action]) -> None:
    """START -> DOING for each action not begun yet, as each type's machine allows."""
    for a in actions:
        if a.state == START:
            a.state = a.type.lifecycle.next("begin", START)


@contextlib.contextmanager
def no_gc_rescans(actions: Sequence[Action]) -> Iterator[None]:
    """The actions live for the whole run, and what the run adds to them (timings,
    undo facts, journal text) too: keep the cyclic GC from rescanning them on every
    collection, which made large runs superlinear. Large runs collect no cycles until
    they end (the few a plugin makes wait for then). The collector is the process's:
    a library running other transactions on other threads meanwhile collects none
    either until the large run ends."""
    import gc

    frozen = len(actions) >= 1000 and gc.isenabled()
    if frozen:
        gc.freeze()
        gc.disable()
    try:
        yield
    finally:
        if frozen:
            gc.enable()
            gc.unfreeze()


def point_step(atype: ActionType) -> str:
    """The step that takes a type's point in time: the switch when it has one (an
    overlay made earlier becomes the drive), else the snapshot itself."""
    return "invalidate" if implements(atype, "invalidate") else "do"


def implements(atype: ActionType, step: str) -> bool:
    cls = type(atype)
    return getattr(cls, step) is not getattr(ActionType, step) or (
        getattr(cls, step + "_many") is not getattr(ActionType, step + "_many")
    )


def units(actions: Sequence[Action], reverse: bool, parallel: bool = False) -> list[list[Action]]:
    """Split a phase into units that run one after another (or ``parallel``).

    Serially, the order of the actions is kept exactly (reversed for cancel);
    consecutive actions of one batched type form one batch. In parallel, each
    batched type is one unit and every other target is one unit, so order is kept
    per target while different targets run at once.
    """
    ordered = list(reversed(actions)) if reverse else list(actions)
    if parallel:
        groups: dict[Any, list[Action]] = {}
        for a in ordered:
            groups.setdefault(id(a.type) if a.type.batched else a.target, []).append(a)
        return list(groups.values())
    units: list[list[Action]] = []
    for a in ordered:
        if units and a.type.batched and units[-1][0].type is a.type:
            units[-1].append(a)
        else:
            units.append([a])
    return units
