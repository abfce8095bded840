"""``libvirt``: disk-only snapshots of libvirt domains, local or on other hosts,
made through libvirt (so the domain XML and ``virsh snapshot-list`` follow them)
and made one all-or-none group with every other action of the transaction.

A domain is named by name or UUID on a connection URI (``qemu:///system`` by
default, ``qemu+ssh://host/system`` for another host, ``qemu:///embed?root=DIR``
in a process of its own). ``libvirt.snapshot`` makes an external disk-only
snapshot (``virDomainSnapshotCreateXML`` with ``DISK_ONLY|ATOMIC``) of all or
the listed disks of a domain, running or shut off; libvirt creates the overlays
and switches the domain to them. Its undo deletes that snapshot through libvirt
(libvirt >= 9.0 merges the overlays back and restores the domain XML).

Ownership: the snapshot carries a random token in its ``<description>``, which
check journals before the snapshot exists; a cancel deletes a snapshot of the
name only when it carries that token, so one made by somebody else is never
touched.

Group snapshots: ``libvirt.snapshot-delete`` removes a member through libvirt and
``libvirt.snapshot-revert`` is refused at check (:mod:`blktx_plugins._libvirt_catalog`);
both are given the member's token and refuse a same-named snapshot without it.

Quiesce: with ``quiesce = "fsfreeze"`` each running domain's guest filesystems
are frozen through libvirt (``virDomainFSFreeze``; the domain needs a connected
guest agent), with ``"pause"`` every running domain is suspended; both are ended
(resume, then thaw) after the commit point or the rollback, in every outcome,
and by ``blktx recover``. Domains already paused stay paused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Hold, Leftover, Param, Refused, Register, RunContext, hookimpl
from blktx_plugins._libvirt_base import (
    CALL_TIMEOUT,
    DEFAULT_URI,
    DELETE_EXTERNAL,
    FREEZE,
    PAUSE,
    RESERVE,
    _all_at_once,
    _Call,
    _domain_state,
    _embedded_connection,
    _find,
    _load,
    _msg,
    _need_libvirt,
    _ours,
    agent_state,
    creation_time,
    disks,
    embedded,
    escape,
    libvirt,
    open_connection,
    quoteattr,
    uri_key,
    uuid_like,
    version_text,
)

if TYPE_CHECKING:
    pass


__all__ = ["blktx_quiesce", "blktx_register_action_types", "blktx_resume", "blktx_resume_many", "open_connection"]


def connection(ctx: RunContext, uri: str) -> Any:
    """The run's one connection to ``uri``, closed when the run ends (the process's
    one connection, kept, for an embedded driver)."""
    if embedded(uri):
        return ctx.resource(f"libvirt:{uri}", partial(_embedded_connection, uri))

    def make() -> Any:
        conn = open_connection(uri)
        ctx.on_close(lambda: conn.close())
        return conn

    return ctx.resource(f"libvirt:{uri}", make)


def lookup(conn: Any, ref: str) -> Any:
    """The domain named ``ref`` (a UUID or a name) on ``conn``."""
    if not uuid_like(ref):
        return conn.lookupByName(ref)
    try:
        return conn.lookupByUUIDString(ref)
    except libvirt.libvirtError:
        return conn.lookupByName(ref)


def _budget(ctx: RunContext, default: float = CALL_TIMEOUT) -> float:
    """How long a libvirt call may take: inside a quiesce window, what is left of its
    budget less a reserve, so a domain that hangs fails in time."""
    if ctx.window_deadline is None:
        return default
    left = ctx.window_deadline - time.monotonic() - min(RESERVE, ctx.options.max_window / 4)
    return max(0.05, min(default, left))


def _pending(ctx: RunContext) -> dict[int, _Call]:
    """Snapshot creations still running in a thread after their step gave up on them."""
    return ctx.resource("libvirt:pending", dict)


_DOMAIN = (
    Param("domain", "str", required=True, doc="the domain's name or UUID"),
    Param("uri", "str", default=DEFAULT_URI, doc="the libvirt connection URI (qemu:///system, qemu+ssh://host/system, …)"),
)


class _LibvirtType(ActionType):
    def target(self, action: Action) -> str:
        return f"libvirt:{uri_key(action.params['uri'])}/{action.params['domain']}"

    def _open(self, action: Action, ctx: RunContext) -> tuple[Any, Any]:
        conn = connection(ctx, action.params["uri"])
        ref = action.undo.get("uuid") or action.params["domain"]
        try:
            return conn, lookup(conn, ref)
        except libvirt.libvirtError as exc:
            raise Refused(
                f"no domain {ref!r} at {action.params['uri']}: {_msg(exc)}", hint="`virsh -c URI list --all` lists the domains"
            ) from None

    def _identify(self, action: Action, ctx: RunContext) -> tuple[Any, Any]:
        _need_libvirt()
        conn, dom = self._open(action, ctx)
        action.undo.update({"uuid": dom.UUIDString(), "domain_name": dom.name()})
        # one domain named by name or UUID, or through two key files, is one target
        action.target = f"libvirt:{uri_key(action.params['uri'])}/{dom.UUIDString()}"
        # kept for the quiesce: a handle names its domain by UUID (libvirt finds it by
        # UUID at every call), so it is the domain a lookup by UUID would give
        _checked(ctx)[action.target] = dom
        return conn, dom


class Snapshot(_LibvirtType):
    """An external disk-only snapshot of a libvirt domain's disks, made and undone through libvirt."""

    name = "libvirt.snapshot"
    revert_type = "libvirt.snapshot-revert"
    delete_type = "libvirt.snapshot-delete"
    params = (
        *_DOMAIN,
        Param("name", "str", required=True, doc="the snapshot's name (libvirt's snapshot list shows it)"),
        Param("disks", "list[str]", doc="the disks to snapshot, by target dev (vda); default: every writable disk"),
    )

    def check(self, action: Action, ctx: RunContext) -> None:
        conn, dom = self._identify(action, ctx)
        p, where = action.params, f"domain {action.params['domain']} at {action.params['uri']}"
        name = p["name"]
        if not name or "/" in name or name.startswith(".") or len(name.encode()) > 255 or not name.isprintable():
            raise Refused(
                f"{where}: {name!r} is not a usable snapshot name", hint="a printable name without '/', not starting with '.'"
            )
        version = ctx.resource(f"libvirt-version:{p['uri']}", conn.getLibVersion)
        if version < DELETE_EXTERNAL:
            raise Refused(
                f"{where}: undoing an external snapshot deletes it through libvirt, which needs libvirt "
                f">= {version_text(DELETE_EXTERNAL)}; this host runs {version_text(version)}"
            )
        before = sorted(s.getName() for s in dom.listAllSnapshots(0))  # also tells whether the name is taken
        if name in before:
            raise Refused(f"{where} already has a snapshot named {name!r}", hint="choose another name")
        have = disks(dom)
        chosen = list(p.get("disks") or have)
        unknown = [d for d in chosen if d not in have]
        if unknown or not chosen:
            raise Refused(
                f"{where} has no writable disk {', '.join(unknown) or '(none at all)'}",
                hint=f"its disks: {', '.join(have) or 'none'}",
            )
        state = _domain_state(dom)
        if state not in ("running", "paused", "shutoff"):
            raise Refused(f"{where} is {state}", hint="snapshot it running, paused or shut off")
        if "fsfreeze" in ctx.options.quiesce and state == "running" and agent_state(dom) != "connected":
            raise Refused(
                f'quiesce = "{ctx.options.quiesce}" freezes the guest filesystems of {where} through its '
                f"guest agent, which is {agent_state(dom) or 'not configured'}",
                hint="add an org.qemu.guest_agent.0 channel and run qemu-ga in the guest",
            )
        action.undo.update(
            {
                "uri_key": uri_key(p["uri"]),
                "token": f"blktx-{ctx.txid}-{os.urandom(8).hex()}",
                "state": state,
                "disks": {d: have[d] for d in chosen},
                "overlays": {d: f"{os.path.splitext(have[d])[0]}.{name}" for d in chosen if have[d]},
                "before": before,
            }
        )

    def _xml(self, action: Action, ctx: RunContext, current: dict[str, str]) -> str:
        """The snapshot's XML, given the domain's disks as they are now (:func:`disks`):
        the chosen ones external, every other one ``snapshot='no'``."""
        chosen = action.undo["disks"]
        lines = [
            f"<domainsnapshot><name>{escape(action.params['name'])}</name>",
            f"<description>made by blktx transaction {escape(ctx.txid)} {escape(action.undo['token'])}</description><disks>",
        ]
        for dev in current:
            if dev not in chosen:
                lines.append(f"<disk name={quoteattr(dev)} snapshot='no'/>")
                continue
            overlay = action.undo["overlays"].get(dev)
            source = f"<source file={quoteattr(overlay)}/>" if overlay else ""
            lines.append(f"<disk name={quoteattr(dev)} snapshot='external'><driver type='qcow2'/>{source}</disk>")
        return "".join(lines) + "</disks></domainsnapshot>"

    def _create(self, action: Action, ctx: RunContext) -> None:
        # inside a window, the handle its quiesce took: no lookup (a round trip to a
        # remote host) between suspend and resume
        dom = _held(ctx).get(action.target) or self._open(action, ctx)[1]
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        try:
            text = _prepared(ctx).pop(action.index, None) or self._xml(action, ctx, disks(dom))
            snap = dom.snapshotCreateXML(text, flags)
        except libvirt.libvirtError as exc:
            action.undo["made"] = False  # ATOMIC: libvirt made nothing
            raise ActionFailed(f"domain {action.params['domain']} at {action.params['uri']}: {_msg(exc)}") from None
        action.undo["made"] = True
        if ctx.window_deadline is not None:  # read when the window has ended (blktx_resume*)
            _unstamped(ctx).append((action, snap))
        else:
            action.undo["created"] = creation_time(snap.getXMLDesc(0))

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Every domain's check at once, each in its own thread: each check is a handful
        of round trips to libvirt (lookup, XML, state, snapshots), ~3 ms a domain one
        after another. libvirt and each URI's connection are opened first, once."""
        _need_libvirt()
        for uri in dict.fromkeys(a.params["uri"] for a in actions):
            try:
                connection(ctx, uri)
            except ActionFailed:
                pass  # each of its checks tries again and says why
        results = _all_at_once([partial(self.check, a, ctx) for a in actions], CALL_TIMEOUT)
        failures = {a.index: r for a, r in zip(actions, results, strict=True) if isinstance(r, BaseException)}
        if failures:
            raise ActionFailures(failures)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Every domain's snapshot at once, each in its own thread, bounded by the window."""
        results = _all_at_once(
            [partial(self._create, a, ctx) for a in actions], _budget(ctx), _pending(ctx), [a.index for a in actions]
        )
        # libvirt's answers ("made", "created") are journaled with do's results, after the
        # window: no write inside it. A run killed before that leaves them unrecorded, and
        # cancel still finds exactly its snapshot by the token journaled before the window.
        failures = {a.index: r for a, r in zip(actions, results, strict=True) if isinstance(r, BaseException)}
        if failures:
            raise ActionFailures(failures)

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        results = _all_at_once([partial(self.cancel, a, ctx) for a in actions], CALL_TIMEOUT)
        failures = {a.index: r for a, r in zip(actions, results, strict=True) if isinstance(r, BaseException)}
        if failures:
            raise ActionFailures(failures)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        """Delete the snapshot of the name that carries this action's token (libvirt
        merges its overlays back into the images the domain used before)."""
        if "token" not in action.undo:
            return  # never checked: nothing was made
        late = _pending(ctx).pop(action.index, None)
        if late is not None:  # a create that outlived its step: let it end first
            late.done.wait(CALL_TIMEOUT)
        try:
            _, dom = self._open(action, ctx)
            snap = _find(dom, action.params["name"])
        except Exception as exc:  # noqa: BLE001 - judged below
            if action.undo.get("made") is False:
                return  # libvirt refused the atomic create: nothing was made
            raise ActionFailed(f"{exc}: its snapshot {action.params['name']!r} cannot be looked for") from None
        if snap is None or not _ours(snap, action.undo["token"]):
            return  # not made, already deleted, or somebody else's
        try:
            snap.delete(0)
        except libvirt.libvirtError as exc:
            raise ActionFailed(
                f"domain {action.params['domain']} at {action.params['uri']}: deleting snapshot "
                f"{action.params['name']!r}: {_msg(exc)}"
            ) from None

    def leftovers(self, action: Action) -> list[Leftover]:
        files = ", ".join(action.undo.get("overlays", {}).values())
        what = f"maybe snapshot {action.params['name']!r} of domain {action.params['domain']}"
        try:
            present = self.member_exists(action)
        except Exception:  # noqa: BLE001 - name what we know
            present = None
        if present is False:
            return []
        if present:
            what = f"snapshot {action.params['name']!r} of domain {action.params['domain']}"
        return [Leftover(action.target, what + (f" (overlays {files})" if files else ""))]

    def revert_params(self, action: Action) -> dict[str, Any]:
        return self.delete_params(action)

    def delete_params(self, action: Action) -> dict[str, Any]:
        """The domain by its UUID (a renamed domain is still found, a same-named other
        one is not), the snapshot's name and the token that proves it is this one."""
        if not action.undo.get("token"):
            raise ValueError(
                f"the catalog holds no ownership token for snapshot {action.params['name']!r} of domain "
                f"{action.params['domain']}: it could not be told from a same-named remake"
            )
        return {
            "uri": action.params["uri"],
            "domain": action.undo.get("uuid") or action.params["domain"],
            "name": action.params["name"],
            "token": action.undo["token"],
        }

    def member_exists(self, action: Action) -> bool | None:
        if _load() is None or "token" not in action.undo:
            return None
        uri = action.params["uri"]
        conn = _embedded_connection(uri) if embedded(uri) else open_connection(uri)
        try:
            try:
                dom = lookup(conn, action.undo.get("uuid") or action.params["domain"])
            except libvirt.libvirtError:
                return False
            snap = _find(dom, action.params["name"])
            return snap is not None and _ours(snap, action.undo["token"])
        finally:
            if not embedded(uri):
                conn.close()


# -- quiesce ---------------------------------------------------------------------------


def _unstamped(ctx: RunContext) -> list[tuple[Action, Any]]:
    """Snapshots made inside the window whose creation time is read after it."""
    return ctx.resource("libvirt:unstamped", list)


def _stamp_created(ctx: RunContext) -> None:
    """The creation time of each snapshot made inside the window (its identity in the
    catalog), read once the domains run again, before the commit write: all at once."""
    pending, taken = _unstamped(ctx), []
    while True:  # each taken once, also when two resumes end at once
        try:
            taken.append(pending.pop())
        except IndexError:
            break

    def stamp(action: Action, snap: Any) -> None:
        try:
            action.undo["created"] = creation_time(snap.getXMLDesc(0))
        except libvirt.libvirtError:
            pass  # left out: a delete then refuses this member rather than guess

    _all_at_once([partial(stamp, a, snap) for a, snap in taken], CALL_TIMEOUT)


def _held(ctx: RunContext) -> dict[str, Any]:
    """This run's handles of the domains it quiesced, by target (the URI and the UUID:
    one UUID may be defined on two hosts); none in a new process."""
    return ctx.resource("libvirt:held", dict)


def _checked(ctx: RunContext) -> dict[str, Any]:
    """The handles this run's checks took, by target."""
    return ctx.resource("libvirt:checked", dict)


def _prepared(ctx: RunContext) -> dict[int, str]:
    """Each snapshot's XML, written before the window (by action index)."""
    return ctx.resource("libvirt:xml", dict)


def _hold_domain(ctx: RunContext, hold: Hold) -> Any | None:
    conn = connection(ctx, hold.data["uri"])
    try:
        return conn.lookupByUUIDString(hold.data["uuid"])
    except libvirt.libvirtError:
        return None  # undefined since: nothing left to resume


def _stamp(hold: Hold, call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        hold.start = time.monotonic()
        return call()

    return run


@hookimpl
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> list[Hold]:
    """Freeze the running domains' guests (``fsfreeze``), then suspend the running
    domains (``pause``), all at once. Every hold is journaled before its domain is
    touched; a domain already paused is left as it is."""
    mode = ctx.options.quiesce
    ours = [a for a in actions if a.type.name == Snapshot.name and "uuid" in a.undo]
    if mode == "none" or not ours:
        return []
    checked = _checked(ctx)
    domains: dict[str, tuple[str, Any]] = {}
    for a in ours:
        if a.target not in domains:  # the check's handle (by UUID); a lookup by UUID without one
            dom = checked.get(a.target) or lookup(connection(ctx, a.params["uri"]), a.undo["uuid"])
            domains[a.target] = (a.params["uri"], dom)
    # Everything a domain's snapshot needs is read before the window, each domain's
    # state and disks at once: the window holds only suspend, the snapshots and resume
    # (as by hand). A domain whose state cannot be read is not snapshotted unpaused.
    read = _all_at_once([partial(_state_and_disks, d) for _, d in domains.values()], _budget(ctx))
    now: dict[str, tuple[str, dict[str, str]]] = {}
    for (t, (u, d)), r in zip(domains.items(), read, strict=True):
        if isinstance(r, BaseException):
            raise ActionFailed(f"domain {d.name()} at {u}: reading its state and disks: {_msg(r)}")
        now[t] = r
    for a in ours:
        _prepared(ctx)[a.index] = a.type._xml(a, ctx, now[a.target][1])  # type: ignore[attr-defined]
    _held(ctx).update({t: d for t, (_, d) in domains.items()})
    running = [(t, u, d) for t, (u, d) in domains.items() if now[t][0] == "running"]
    holds: list[Hold] = []
    steps = [(FREEZE, "fsFreeze")] if "fsfreeze" in mode else []
    steps += [(PAUSE, "suspend")] if "pause" in mode else []
    for kind, method in steps:
        new = [Hold(kind, t, {"uri": u, "uuid": d.UUIDString(), "domain": d.name()}) for t, u, d in running]
        ctx.holding(new)  # journaled before any domain is touched
        holds += new
        results = _all_at_once([_stamp(h, getattr(d, method)) for h, (_, _, d) in zip(new, running, strict=True)], _budget(ctx))
        for h, r in zip(new, results, strict=True):
            if isinstance(r, BaseException):
                raise ActionFailed(f"domain {h.data['domain']} at {h.data['uri']}: {method}: {_msg(r)}")
    return holds


def _state_and_disks(dom: Any) -> tuple[str, dict[str, str]]:
    return _domain_state(dom), disks(dom)


def _end(ctx: RunContext, hold: Hold) -> None:
    """Resume a suspended domain or thaw a frozen guest; nothing for a domain that is
    gone or shut off, or was never suspended (a run killed before it did)."""
    dom = _held(ctx).get(hold.target) or _hold_domain(ctx, hold)
    if dom is not None:
        try:
            if hold.kind == PAUSE:
                try:
                    dom.resume()  # at once: no round trip before it inside the window
                except libvirt.libvirtError:
                    if _domain_state(dom) == "paused":
                        raise  # still paused: a real failure
            elif hold.kind == FREEZE and _domain_state(dom) == "running":
                dom.fsThaw()
        except libvirt.libvirtError as exc:
            raise ActionFailed(
                f"domain {hold.data['domain']} at {hold.data['uri']}: {'resume' if hold.kind == PAUSE else 'thaw'}: {_msg(exc)}"
            ) from None
    hold.end = time.monotonic()


def _resume_budget(ctx: RunContext) -> float:
    if ctx.window_deadline is None:
        return 60.0
    return max(0.25, min(60.0, ctx.window_deadline + RESERVE - time.monotonic()))


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    if hold.kind not in (PAUSE, FREEZE):
        return None
    _need_libvirt()
    result = _all_at_once([partial(_end, ctx, hold)], _resume_budget(ctx))[0]
    _stamp_created(ctx)
    if isinstance(result, BaseException):
        raise result
    return True


@hookimpl
def blktx_resume_many(ctx: RunContext, holds: list[Hold]) -> list[Hold] | None:
    """Resume (or thaw) every domain of a run of holds at once, one thread each."""
    ours = [h for h in holds if h.kind in (PAUSE, FREEZE)]
    if not ours or _load() is None:
        return None
    results = _all_at_once([partial(_end, ctx, h) for h in ours], _resume_budget(ctx))
    _stamp_created(ctx)
    return [h for h, r in zip(ours, results, strict=True) if not isinstance(r, BaseException)]


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    from blktx_plugins import _libvirt_catalog

    types: tuple[type[ActionType], ...] = (Snapshot, *_libvirt_catalog.TYPES)
    for cls in types:
        register(cls)
