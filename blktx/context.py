"""What an action type's callbacks are given besides the action: the run's context."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import pluggy

from blktx.events import Hold

T = TypeVar("T")


#: How a transaction may hold its targets still (``[options] quiesce``).
QUIESCE_MODES = ("none", "pause", "fsfreeze", "fsfreeze+pause")


@dataclass(frozen=True)
class OptionSpec:
    """How one spec option is written and checked: the one declaration that spec
    validation, the JSON Schema and the docs all read."""

    kind: str  # "int", "float" or "str"
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, value: Any) -> Any:
        """The option's value from what a spec wrote (a duration in seconds)."""
        if self.kind == "duration" and isinstance(value, str):
            return duration(value)
        return float(value) if self.kind in ("float", "duration") else value

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if self.kind == "duration" and isinstance(value, str):
            try:
                value = duration(value)
            except ValueError:
                return f'must be a duration such as "2s", "500ms" or "1m", got {value!r}'
        if self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind in ("float", "duration"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            return f"must be of type {self.kind}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        # written so that NaN fails both
        if self.minimum is not None and not value >= self.minimum:
            return f"must be at least {self.minimum:g}, got {value!r}"
        if self.maximum is not None and not value <= self.maximum:
            return f"must be at most {self.maximum:g}, got {value!r}"
        return None

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.doc}
        if self.choices:
            out["enum"] = list(self.choices)
        elif self.kind == "duration":
            number: dict[str, Any] = {"type": "number"}
            if self.minimum is not None:
                number["minimum"] = self.minimum
            if self.maximum is not None:
                number["maximum"] = self.maximum
            out["oneOf"] = [number, {"type": "string", "pattern": _DURATION}]
            return out
        else:
            out["type"] = {"int": "integer", "float": "number", "str": "string"}[self.kind]
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


_DURATION = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)?\s*$"


def duration(text: str) -> float:
    """Seconds from ``"2s"``, ``"500ms"``, ``"1.5m"`` or ``"3"``; ValueError otherwise."""
    import re

    match = re.match(_DURATION, text)
    if not match:
        raise ValueError(text)
    number = float(match.group(0).strip().rstrip("msdh").strip() or "x")
    unit = match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _option(
    default: Any,
    kind: str,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    return field(default=default, metadata={"spec": OptionSpec(kind, doc, minimum, maximum, choices)})


@dataclass
class Options:
    """How a transaction runs. A spec's ``[options]`` table fills the fields declared
    with a spec (:func:`spec_options`); the caller's settings (``allow_exec``,
    ``roots``) can only be given outside the spec."""

    jobs: int = _option(1, "int", "steps run at once (threads); 1 keeps the exact order", minimum=1, maximum=256)
    quiesce: str = _option("none", "str", "hold the targets still around do/invalidate", choices=QUIESCE_MODES)
    finalize_retries: int = _option(
        2, "int", "retries of a failed finalize or finish step after the commit", minimum=0, maximum=100
    )
    retry_delay: float = _option(
        0.2, "float", "seconds before the first retry (the n-th waits n times as long)", minimum=0, maximum=3600
    )
    cancel_retries: int = _option(1, "int", "retries of a failed cancel during a rollback", minimum=0, maximum=100)
    max_window: float = _option(
        30.0,
        "duration",
        'the longest a quiesce window may last ("2s", "500ms"); '
        "past it the run rolls back, and if the run is dead or stuck the watchdog "
        "resumes every hold",
        minimum=0.05,
        maximum=3600,
    )
    #: Whether ``exec`` actions (and any type that runs a command) may run.
    allow_exec: bool = False
    #: Directories that every path in the spec must stay under (defaults to the spec's).
    roots: list[str] = field(default_factory=list)
    #: Further directories where VM and guest-agent sockets may be (``--vm-root``).
    vm_roots: list[str] = field(default_factory=list)
    #: Whether ``tcp:HOST:PORT`` VM and agent addresses are allowed (``--allow-tcp``).
    allow_tcp: bool = False
    #: Whether paths in folders that others can write are allowed (``--allow-shared-folders``).
    shared_folders: bool = False
    #: The group snapshot this run makes (``blktx.catalog``): its group and expanded name.
    group: str = ""
    snapshot: str = ""
    #: The group snapshots (their creating transactions' ids) this run deletes: they
    #: leave the catalog in its commit write (``blktx delete``/``prune``).
    forgets: tuple[str, ...] = ()
    #: The spec named no group: it is the spec file's name (``blktx.catalog.default_group``).
    group_defaulted: bool = False
    #: Per-type settings from the spec's ``[options.<plugin>]`` tables.
    extra: dict[str, Any] = field(default_factory=dict)


def spec_options() -> dict[str, OptionSpec]:
    """Every option a spec may set, with its declaration, in declaration order."""
    return {f.name: f.metadata["spec"] for f in fields(Options) if "spec" in f.metadata}


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
        #: The run's journal file ("" without one): a plugin keeps what it freezes off it.
        self.journal_path = ""
        #: While a quiesce window is open: the ``time.monotonic()`` by which it must
        #: end (``max_window``). Plugins bound their calls inside the window by it.
        self.window_deadline: float | None = None
        #: Set by the executor: makes actions' undo facts durable in the journal.
        self.on_remember: Callable[[list[Any]], None] | None = None

    def holding(self, holds: list[Hold]) -> None:
        """Announce what a quiesce hook is about to pause, *before* pausing it.

        The executor journals the holds at once, so that ``blktx recover`` resumes
        them even if the run is killed between the pause and the hook's return.
        """
        if self.on_hold is not None and holds:
            self.on_hold(holds)

    def remember(self, actions: list[Any]) -> None:
        """Make the ``undo`` facts of ``actions`` durable in the journal *now*, before
        the step goes on: the identity of what ``do`` made under a private name
        (inode, subvolume UUID), recorded before it is published under the name the
        spec asked for, so that a cancel after a crash removes only that. One durable
        write per call: call it once per batch. Raises when the journal cannot
        record it; ``do`` must then fail (and its cancel remove the private object)."""
        if self.on_remember is not None and actions:
            self.on_remember(actions)

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
