"""What an action type's callbacks are given besides the action: the run's context."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from blktx.events import Hold

T = TypeVar("T")


@dataclass
class Options:
    """How a transaction runs. A spec's ``[options]`` table fills these; the caller's
    settings (``allow_exec``, ``roots``) can only be given outside the spec."""

    jobs: int = 1
    quiesce: str = "none"
    finalize_retries: int = 2
    retry_delay: float = 0.2
    cancel_retries: int = 1
    #: Whether ``exec`` actions (and any type that runs a command) may run.
    allow_exec: bool = False
    #: Directories that every path in the spec must stay under (defaults to the spec's).
    roots: list[str] = field(default_factory=list)
    #: Per-type settings from the spec's ``[options.<plugin>]`` tables.
    extra: dict[str, Any] = field(default_factory=dict)


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = False
        self.value: Any = None


class RunContext:
    """Shared by every callback of one transaction run.

    ``resource(key, factory)`` gives a type one object per run (a daemon process, an
    open state file) that is closed when the run ends: ``factory`` returns the
    object, and ``on_close`` registers how to release it.
    """

    def __init__(self, txid: str, options: Options, base_dir: str, hook: pluggy.HookRelay | None = None) -> None:
        self.txid = txid
        self.options = options
        self.base_dir = base_dir
        self.hook = hook
        self._resources: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        #: Set by the executor: makes holds durable in the journal.
        self.on_hold: Callable[[list[Hold]], None] | None = None

    def holding(self, holds: list[Hold]) -> None:
        """Announce what a quiesce hook is about to pause, *before* pausing it.

        The executor journals the holds at once, so that ``blktx recover`` resumes
        them even if the run is killed between the pause and the hook's return.
        """
        if self.on_hold is not None and holds:
            self.on_hold(holds)

    def resource(self, key: str, factory: Callable[[], T]) -> T:
        with self._lock:
            slot = self._resources.setdefault(key, _Slot())
        # Build outside the run-wide lock so that resources of different keys (one
        # connection per VM) are made at once; the slot's own lock makes one per key.
        with slot.lock:
            if not slot.ready:
                slot.value, slot.ready = factory(), True
            return slot.value  # type: ignore[no-any-return]

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> list[str]:
        """Release every resource, newest first; return the errors it met."""
        errors = []
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - a close must not hide the outcome
                errors.append(str(exc))
        self._resources.clear()
        return errors
