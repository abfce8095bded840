"""The quiesce window of the ``qmp`` plugin: the run's QMP and guest-agent
connections, pausing VMs and freezing guests, resuming them, and the deadlines
that keep every command inside a window within the window's budget.

The hooks are re-exported by :mod:`blktx_plugins.qmp`, the plugin pluggy loads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from blktx import Action, ActionFailed, Hold, RunContext, hookimpl
from blktx_plugins._qemu import Agent, Qmp, VmGone, gather, run_async
from blktx_plugins._qmp_monitor import Monitor, MonitorBusy


class _Window:
    """Whether this plugin's quiesce window is open: ``ctx.window_deadline`` is
    meaningful only until the holds are resumed."""

    open = False


def _window(ctx: RunContext) -> _Window:
    return ctx.resource("qmp:window", _Window)


#: Seconds kept free at the end of a window for the rollback and the resumes, so
#: that the run itself ends the window before the watchdog's grace runs out.
RESERVE = 0.5


def _budget(ctx: RunContext, default: float = 120.0) -> float:
    """How long a QMP command may take: inside a quiesce window, what is left of the
    window's budget (``max_window``) less a reserve; a VM that never answers then
    fails its actions in time, and the group rolls back within the budget rather
    than staying paused for the command's timeout."""
    if ctx.window_deadline is None or not _window(ctx).open:
        return default
    left = ctx.window_deadline - time.monotonic() - min(RESERVE, ctx.options.max_window / 4)
    return max(0.05, min(default, left))


def _resume_budget(ctx: RunContext) -> float:
    """How long a resume (``cont``, thaw) may take: until shortly after the window's
    deadline (before the watchdog's grace ends), so one VM that hangs cannot keep
    the run from closing the window; outside a window (recover), the usual."""
    if ctx.window_deadline is None:
        return FREEZE_TIMEOUT
    return max(0.25, min(FREEZE_TIMEOUT, ctx.window_deadline + RESERVE - time.monotonic()))


class _Connections:
    """A run's connections of one kind (QMP monitors, or guest agents), one per
    address, opened together when first needed."""

    def __init__(self, kind: type[Qmp]) -> None:
        self._kind = kind
        self._lock = threading.Lock()
        self.open: dict[str, Qmp] = {}

    def many(self, addresses: Sequence[str]) -> dict[str, Qmp | VmGone]:
        failed: dict[str, VmGone] = {}
        with self._lock:
            missing = [a for a in dict.fromkeys(addresses) if a not in self.open]
            for address, got in (self._kind.open_many(missing) if missing else {}).items():
                if isinstance(got, Qmp):
                    self.open[address] = got
                else:
                    failed[address] = got
        return {a: self.open.get(a) or failed[a] for a in addresses}

    def close(self) -> None:
        for conn in self.open.values():
            conn.close()


def _connections(ctx: RunContext, kind: type[Qmp] = Monitor) -> _Connections:
    def make() -> _Connections:
        conns = _Connections(kind)
        ctx.on_close(conns.close)
        return conns

    return ctx.resource(f"qmp:{kind.__name__}", make)


def _open_all(ctx: RunContext, addresses: Sequence[str], kind: type[Qmp] = Monitor) -> list[Qmp]:
    """The run's connections to ``addresses`` (made together if new); raises if one fails."""
    got = _connections(ctx, kind).many(addresses)
    for conn in got.values():
        if isinstance(conn, VmGone):
            raise conn
    return [cast(Qmp, got[a]) for a in addresses]


def connection(ctx: RunContext, address: str) -> Qmp:
    return _open_all(ctx, [address])[0]


QUIESCE_PAUSE = ("pause", "fsfreeze+pause")
QUIESCE_FREEZE = ("fsfreeze", "fsfreeze+pause")
#: How long a guest may take to flush and freeze its filesystems.
FREEZE_TIMEOUT = 60.0


def _raise_first(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply


def _stamped(
    holds: list[Hold], conns: list[Qmp], commands: list[tuple[str, dict[str, Any] | None]], timeout: float = 120.0
) -> list[Any]:
    """Send each connection its command, all at once from the one loop, setting each
    hold's start just before its command leaves; the replies or exceptions."""

    async def one(hold: Hold, conn: Qmp, command: tuple[str, dict[str, Any] | None]) -> Any:
        if command[0] == "stop":
            conn.event_time("STOP")  # forget older events: only this stop's counts
        hold.start = time.monotonic()
        reply = await conn.execute(*command, timeout=timeout)
        stopped = conn.event_time("STOP") if command[0] == "stop" else None
        if stopped is not None and hold.start <= stopped <= time.monotonic():
            # QEMU's own word for when the VM stopped (its STOP event): the window's start
            hold.start, hold.data["clock"] = stopped, "qemu"
        return reply

    async def all_of() -> list[Any]:
        import asyncio  # only where commands are sent (start-up stays light)

        return await asyncio.gather(*(one(*x) for x in zip(holds, conns, commands, strict=True)), return_exceptions=True)

    return run_async(all_of())


@hookimpl
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> list[Hold]:
    """Freeze the guests' filesystems (``fsfreeze``), then stop the VMs (``pause``).

    Only running VMs are stopped, and only thawed guests frozen: a VM that was
    already paused stays paused, a guest already frozen stays frozen. Every hold is
    journaled before its VM is touched.
    """
    mode = ctx.options.quiesce
    if mode not in QUIESCE_PAUSE + QUIESCE_FREEZE:
        return []
    _window(ctx).open = True
    ours = [a for a in actions if a.type.name.startswith("qmp.")]
    addresses = sorted({a.params["vm"] for a in ours})
    conns = _open_all(ctx, addresses)  # connected at check already
    statuses = gather([(c, "query-status", None) for c in conns], _budget(ctx))
    _raise_first(statuses)
    running = [c for c, status in zip(conns, statuses, strict=True) if status["running"]]
    holds: list[Hold] = []
    if mode in QUIESCE_FREEZE:
        holds += _freeze(ctx, ours, {c.address for c in running})
    if mode in QUIESCE_PAUSE:
        holds += _pause(ctx, running)
    return holds


def _freeze(ctx: RunContext, actions: list[Action], running: set[str]) -> list[Hold]:
    """Freeze each running guest's filesystems through its agent (a paused guest
    cannot answer its agent, and its disks do not change)."""
    plan: dict[str, tuple[str, list[str]]] = {}  # agent -> (VM, mountpoints)
    for a in actions:
        vm = a.params["vm"]
        if vm in running and a.params.get("agent"):
            plan[a.params["agent"]] = (vm, list(a.params.get("freeze") or []))
    agents = _open_all(ctx, sorted(plan), Agent)
    statuses = gather([(ag, "guest-fsfreeze-status", None) for ag in agents], _budget(ctx))
    _raise_first(statuses)
    thawed = [ag for ag, status in zip(agents, statuses, strict=True) if status != "frozen"]
    holds = [Hold("qga.freeze", f"vm:{plan[ag.address][0]}", {"agent": ag.address, "vm": plan[ag.address][0]}) for ag in thawed]
    ctx.holding(holds)  # journaled before any guest is frozen
    mounts = [plan[ag.address][1] for ag in thawed]
    commands: list[tuple[str, dict[str, Any] | None]] = [
        ("guest-fsfreeze-freeze-list", {"mountpoints": m}) if m else ("guest-fsfreeze-freeze", None) for m in mounts
    ]
    replies = _stamped(holds, thawed, commands, _budget(ctx, FREEZE_TIMEOUT))
    for ag, wanted, reply in zip(thawed, mounts, replies, strict=True):
        if isinstance(reply, BaseException):
            raise ActionFailed(f"VM {plan[ag.address][0]}: {reply}")
        if wanted and reply < len(wanted):
            raise ActionFailed(
                f"VM {plan[ag.address][0]}: the guest agent froze {reply} of the {len(wanted)} "
                f"filesystems {', '.join(wanted)}; is each a mountpoint in the guest?"
            )
    return holds


def _pause(ctx: RunContext, running: list[Qmp]) -> list[Hold]:
    holds = [Hold("qmp.pause", f"vm:{c.address}", {"address": c.address}) for c in running]
    ctx.holding(holds)  # journaled before any VM is stopped
    # A VM that does not answer fails the quiesce within the budget; the executor
    # then resumes every hold (the others run again at once).
    _raise_first(_stamped(holds, running, [("stop", None)] * len(running), _budget(ctx)))
    return holds


def _resume_cmd(hold: Hold) -> tuple[type[Qmp], str, str]:
    """How to end a hold: the connection kind, its address and the command."""
    if hold.kind == "qga.freeze":
        return Agent, hold.data["agent"], "guest-fsfreeze-thaw"
    return Monitor, hold.data["address"], "cont"


async def _end(ctx: RunContext, hold: Hold, conn: Qmp | VmGone) -> None:
    """``cont`` a VM (on a running VM it changes nothing) or thaw a guest. A dead VM
    has nothing left to resume; a live VM whose agent does not answer is still
    frozen, and a VM whose monitor another client holds may still be paused: both
    are raised."""
    try:
        if isinstance(conn, VmGone):
            raise conn
        command = _resume_cmd(hold)[2]
        if command == "cont":
            conn.event_time("RESUME")
        sent = time.monotonic()
        await conn.execute(command, timeout=_resume_budget(ctx))
        resumed = conn.event_time("RESUME") if command == "cont" else None
        if resumed is not None and sent <= resumed <= time.monotonic() and hold.data.get("clock") == "qemu":
            hold.end = resumed  # QEMU's RESUME event: the window's end, on the same clock as its start
            return
    except VmGone as exc:
        if isinstance(exc, MonitorBusy) or (hold.kind == "qga.freeze" and await _vm_alive(ctx, hold.data["vm"])):
            raise
    hold.end = time.monotonic()


async def _vm_alive(ctx: RunContext, address: str) -> bool:
    """Whether the VM at ``address`` answers QMP (on the loop: no blocking calls)."""
    conn = _connections(ctx).open.get(address)
    mine = conn is None
    try:
        if conn is None:
            conn = Monitor(address, connect=False)
            await conn.open()
        await conn.execute("query-status", timeout=5)
        return True
    except MonitorBusy:
        return True  # held by another client: QEMU lives
    except VmGone:
        return False
    finally:
        if mine and conn is not None and conn.connected:
            await conn.disconnect()


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    if hold.kind not in ("qmp.pause", "qga.freeze"):
        return None
    _window(ctx).open = False
    kind, address, _ = _resume_cmd(hold)
    run_async(_end(ctx, hold, _connections(ctx, kind).many([address])[address]))
    return True


@hookimpl
def blktx_resume_many(ctx: RunContext, holds: list[Hold]) -> list[Hold] | None:
    """End every window of a kind at once: all ``cont`` (or thaw) commands leave one
    loop together. Any that failed is left to blktx_resume, which reports it."""
    ours = [h for h in holds if h.kind in ("qmp.pause", "qga.freeze")]
    if not ours:
        return None
    _window(ctx).open = False
    kind = _resume_cmd(ours[0])[0]
    got = _connections(ctx, kind).many([_resume_cmd(h)[1] for h in ours])

    async def all_of() -> list[Any]:
        import asyncio

        return await asyncio.gather(*(_end(ctx, h, got[_resume_cmd(h)[1]]) for h in ours), return_exceptions=True)

    return [h for h, failed in zip(ours, run_async(all_of()), strict=True) if failed is None]
