"""``qmp``: snapshots of running VMs' drives over QMP, atomic per VM by QEMU and
across VMs (and other backends) by blktx.

VMs are named by their QMP address (a unix socket path, or ``tcp:host:port``);
drives by block-backend name, qdev id or node name. All actions of one type on
one VM go to that VM as one QMP ``transaction``; every VM is sent its share at
once, from one event loop. With ``quiesce = "pause"`` every running VM of the
transaction is stopped before the do phase and continued right after the commit
point or the rollback; a VM that was already paused stays paused. With
``"fsfreeze"`` (or ``"fsfreeze+pause"``) each guest's filesystems are frozen
through its guest agent first and thawed last; a guest already frozen stays
frozen. If a VM dies during the transaction the rest of the group rolls back,
and its own actions are undone offline on its image files once QEMU's lock is
gone.

``qmp.external-create`` (:mod:`blktx_plugins._qmp_external`) keeps its switch
across a restart of the VM when given ``device``, the symlink the VM's ``-drive``
opens; a monitor that another client holds (libvirt's) is refused at check within
about a second (:mod:`blktx_plugins._qmp_monitor`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Leftover, Param, Refused, Register, RunContext, hookimpl
from blktx_plugins._image import Snapshot, bare, has_protocol, name_problem, open_image, read_header, shown, within
from blktx_plugins._qemu import Agent, Qmp, StorageDaemon, VmGone, gather, holder
from blktx_plugins._qmp_internal import pick, same, snapshots_of, twice
from blktx_plugins._qmp_monitor import MonitorBusy
from blktx_plugins._qmp_window import (  # the hooks are re-exported: pluggy finds them here
    _budget,
    _connections,
    blktx_quiesce,
    blktx_resume,
    blktx_resume_many,
    connection,
)

__all__ = ["blktx_quiesce", "blktx_register_action_types", "blktx_resume", "blktx_resume_many"]


def _node_info(node: str, inserted: dict[str, Any]) -> dict[str, Any]:
    return {
        "node": node,
        "file": inserted["file"],
        "format": inserted["drv"],
        "size": inserted["image"]["virtual-size"],
        "snapshots": snapshots_of(inserted["image"]),
    }


def resolve(conn: Qmp, drive: str, blocks: list[Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """The node behind ``drive``: its node name, image file, format and snapshots
    (:class:`~blktx_plugins._image.Snapshot`, with their dates), and ``key``: the
    drive's id when it is a drive's active node (whatever name the spec used for
    it), else the node name.

    ``blocks`` is the VM's ``query-block`` reply, when the caller already has it; a
    drive's active node is found there, any other node in ``query-named-block-nodes``.
    """
    for dev in conn.cmd("query-block", timeout=timeout) if blocks is None else blocks:
        inserted = dev.get("inserted")
        if inserted and drive in (dev.get("device"), dev.get("qdev"), inserted.get("node-name")):
            return {**_node_info(inserted["node-name"], inserted), "key": dev.get("device") or inserted["node-name"]}
    for info in conn.cmd("query-named-block-nodes", {"flat": True}, timeout=timeout):
        if info["node-name"] == drive:
            return {**_node_info(drive, info), "key": drive}
    raise Refused(
        f"VM {conn.address} has no drive or node {drive!r}",
        hint="`query-block` lists the drives, `query-named-block-nodes` the nodes",
    )


_COMMON = (
    Param("vm", "address", required=True, doc="the VM's QMP address: a unix socket path or tcp:host:port"),
    Param("drive", "str", required=True, doc="the drive: block-backend name, qdev id or node name"),
    Param(
        "agent",
        "address",
        doc="the host end of the VM's guest-agent channel (unix socket path or tcp:host:port); "
        'needed by quiesce = "fsfreeze" and "fsfreeze+pause"',
    ),
    Param(
        "freeze",
        "list[str]",
        doc="with fsfreeze: the guest's mountpoints to freeze (default: every filesystem the agent can freeze)",
    ),
)


def _file_facts(file: str, ctx: RunContext) -> dict[str, Any]:
    """What blktx may later do with the image file a VM reports (``query-block``): a
    VM's word is not a checked path. Only a plain file under the roots is recorded
    (resolved, with its identity) for an offline undo after the VM died."""
    if has_protocol(file) or not file.startswith("/") or not within(file, ctx.options.roots):
        return {"file_real": None}
    real = os.path.realpath(file)
    try:
        fd = open_image(real)
    except Refused:
        return {"file_real": None}
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return {"file_real": real, "file_ident": [st.st_dev, st.st_ino]}


def _offline_image(a: Action, ctx: RunContext) -> str:
    """The image a dead VM's undo may act on: the file its check recorded under the
    roots, or :class:`ActionFailed` (left and reported)."""
    real = a.undo.get("file_real", os.path.realpath(a.undo["file"]))  # an older journal: confined below
    if not real or not within(real, ctx.options.roots):
        raise ActionFailed(
            f"the VM's image {shown(a.undo['file'])} (as the VM reported it) is not a file under the "
            f"allowed roots ({', '.join(ctx.options.roots)}) [rule confined-paths]: blktx does not act "
            "on it offline; check it by hand, or widen with --root DIR and run blktx recover again"
        )
    return str(real)


class _QmpType(ActionType):
    shares_target = False

    def target(self, action: Action) -> str:
        return f"vm:{action.params['vm']}/{action.params['drive']}"

    def _conn(self, action: Action, ctx: RunContext) -> Qmp:
        return connection(ctx, action.params["vm"])

    def _vms(self, actions: Sequence[Action], ctx: RunContext) -> list[tuple[Qmp | VmGone, list[Action]]]:
        """Each VM's connection (or why there is none) with its share of ``actions``."""
        groups: dict[str, list[Action]] = {}
        for a in actions:
            groups.setdefault(a.params["vm"], []).append(a)
        conns = _connections(ctx).many(list(groups))
        return [(conns[address], group) for address, group in groups.items()]

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Query every VM once (all at once), then check each action against that."""
        failures: dict[int, BaseException] = {}
        vms = self._vms(actions, ctx)
        live = [(c, g) for c, g in vms if isinstance(c, Qmp)]
        for conn, group in vms:
            if isinstance(conn, VmGone):
                hint = (
                    "QEMU serves one client per monitor: give blktx one of its own (a second -qmp), or end the other client"
                    if isinstance(conn, MonitorBusy)
                    else "is the VM running, and is its -qmp socket at that path?"
                )
                refusal = Refused(str(conn), hint=hint)
                failures.update({a.index: refusal for a in group})
        if "fsfreeze" in ctx.options.quiesce:
            self._check_agents(vms, ctx, failures)
        for (conn, group), blocks in zip(live, gather([(c, "query-block", None) for c, _ in live]), strict=True):
            for a in group:
                try:
                    if isinstance(blocks, BaseException):
                        raise blocks
                    info = resolve(conn, a.params["drive"], blocks)
                    # One drive named two ways (id, node name) is one target: for
                    # conflicts and for the locks taken after the checks.
                    a.target = f"vm:{a.params['vm']}/{info['key']}"
                    a.undo.update(
                        {
                            "node": info["node"],
                            "file": info["file"],
                            "format": info["format"],
                            "size": info["size"],
                            "before": [s.id for s in info["snapshots"]],
                        }
                    )
                    a.undo.update(_file_facts(info["file"], ctx))
                    self._check(a, info)
                except Exception as exc:  # noqa: BLE001 - a refusal of this action
                    failures[a.index] = exc
        failures.update(self._check_group([a for a in actions if a.index not in failures]))
        if failures:
            raise ActionFailures(failures)

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        return None

    def _check_group(self, actions: list[Action]) -> dict[int, BaseException]:
        """Refusals of actions that each passed alone but not together (on one drive)."""
        return {}

    def _check_agents(
        self, vms: list[tuple[Qmp | VmGone, list[Action]]], ctx: RunContext, failures: dict[int, BaseException]
    ) -> None:
        """With fsfreeze, every VM needs one agent that answers."""
        wanted: dict[str, list[Action]] = {}
        for _, group in vms:
            named = {a.params["agent"] if a.params.get("agent") else None for a in group}
            freezes = {tuple(a.params.get("freeze") or ()) for a in group}
            vm = group[0].params["vm"]
            if None in named:
                why = Refused(
                    f'quiesce = "{ctx.options.quiesce}" freezes the filesystems of VM {vm} through its guest '
                    "agent, and this action names none",
                    hint='add agent = "<the agent channel\'s socket>"',
                )
            elif len(named) > 1 or len(freezes) > 1:
                why = Refused(
                    f"the actions on VM {vm} name different guest agents or freeze lists",
                    hint="give every action on one VM the same agent and freeze",
                )
            else:
                wanted.setdefault(next(iter(named)) or "", []).extend(group)
                continue
            failures.update({a.index: why for a in group})
        agents = _connections(ctx, Agent).many(list(wanted))
        for address, group in wanted.items():
            got = agents[address]
            if isinstance(got, VmGone):
                why = Refused(
                    f"VM {group[0].params['vm']}: {got}",
                    hint="is qemu-ga running in the guest, and is this the host end of its channel?",
                )
                failures.update({a.index: why for a in group if a.index not in failures})

    def _per_vm(self, actions: Sequence[Action], ctx: RunContext, send: Any) -> None:
        """Run ``send(conn, group)`` for each VM's share of a batch, all VMs at once;
        a VM that fails fails only its own actions."""
        failures: dict[int, BaseException] = {}

        def one(conn: Qmp | VmGone, group: list[Action]) -> None:
            try:
                if isinstance(conn, VmGone):
                    raise conn
                send(conn, group)
            except ActionFailures as exc:
                failures.update(exc.failures)
            except Exception as exc:  # noqa: BLE001 - reported for each action of that VM
                failures.update({a.index: exc for a in group})

        vms = self._vms(actions, ctx)
        if len(vms) == 1:
            one(*vms[0])
        else:
            from concurrent.futures import ThreadPoolExecutor  # here: not at every start

            with ThreadPoolExecutor(max_workers=min(len(vms), 32), thread_name_prefix="blktx-qmp") as pool:
                list(pool.map(lambda vm: one(*vm), vms))
        if failures:
            raise ActionFailures(failures)

    def _per_vm_cmd(self, actions: Sequence[Action], ctx: RunContext, build: Any, record: str | None = None) -> None:
        """Send each VM one command, ``build(group)`` = (name, args), to all VMs at
        once from one loop: the VMs' commands leave together, not one thread apart.

        ``record``: an undo key set on each action to whether QEMU carried out its
        VM's command (a ``transaction`` is all or nothing per VM); left unset when
        the VM died and nobody knows.
        """
        failures: dict[int, BaseException] = {}
        vms = self._vms(actions, ctx)
        live = [(c, g) for c, g in vms if isinstance(c, Qmp)]
        for conn, group in vms:
            if isinstance(conn, VmGone):
                failures.update({a.index: conn for a in group})
        replies = gather([(c, *build(g)) for c, g in live], _budget(ctx))
        for (_, group), reply in zip(live, replies, strict=True):
            if isinstance(reply, BaseException):
                failures.update({a.index: reply for a in group})
            if record and not isinstance(reply, VmGone):
                for a in group:
                    a.undo[record] = not isinstance(reply, BaseException)
        if failures:
            raise ActionFailures(failures)


class InternalCreate(_QmpType):
    """Create an internal snapshot of a running VM's drive (one QMP transaction per VM).

    Several actions may snapshot one drive in one transaction (QEMU iotest 057),
    each with its own name. After QEMU answered, each snapshot's id and date are
    recorded (``undo["id"]``, ``undo["date"]``); a cancel deletes only the snapshot
    with that id, name and date.
    """

    name = "qmp.internal-create"
    shares_target = True
    params = (*_COMMON, Param("name", "str", required=True, doc="the snapshot's name"))
    delete_type = "qmp.internal-delete"
    no_revert = (
        "a running VM's drive cannot be brought back in place (QEMU applies no internal snapshot live): "
        "stop the VM, then revert its image with qcow2.internal-revert (image, id and date: `blktx list --json`)"
    )

    def delete_params(self, action: Action) -> dict[str, Any]:
        """Deleted live, by the id and date QEMU gave it (a same-named remake is never deleted)."""
        from blktx_plugins._qmp_internal import date_text

        date = action.undo.get("date")
        if not action.undo.get("id") or not isinstance(date, list):
            raise ValueError("the catalog has no id and date of this snapshot (made by an older blktx)")
        keep = ("vm", "drive", "agent", "freeze")
        return {
            **{k: action.params[k] for k in keep if action.params.get(k) is not None},
            "name": action.params["name"],
            "id": str(action.undo["id"]),
            "date": date_text(date),
        }

    def member_exists(self, action: Action) -> bool | None:
        """The snapshot with the id and date QEMU gave it is still in the drive's image
        (read from the file's header, without the VM's monitor)."""
        image, sid, date = action.undo.get("file_real"), action.undo.get("id"), action.undo.get("date")
        if not image or not sid or not isinstance(date, list):
            return None
        return any(s.id == sid and list(s.date) == date for s in read_header(image)[1])

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        problem = name_problem(action.params["name"])
        if problem:
            raise Refused(
                f"{self.name} action #{action.index} on drive {action.params['drive']} of VM "
                f"{action.params['vm']}: the snapshot name {shown(action.params['name'])} {problem}",
                hint="give a non-empty UTF-8 name of at most 255 bytes",
            )
        same_name = [s.id for s in info["snapshots"] if s.name == action.params["name"]]
        if same_name:
            raise Refused(
                f"drive {action.params['drive']} of VM {action.params['vm']} already has a snapshot named "
                f"{action.params['name']!r} (id {', '.join(same_name)})"
            )
        if info["format"] != "qcow2":
            raise Refused(f"drive {action.params['drive']} is {info['format']}, not qcow2: no internal snapshots")

    def _check_group(self, actions: list[Action]) -> dict[int, BaseException]:
        # QEMU refuses a second snapshot of one name on a drive: its transaction would fail.
        return twice(
            actions,
            lambda a: (a.target, a.params["name"]),
            lambda first, a: (
                f"actions #{first.index} and #{a.index} both make snapshot {shown(a.params['name'])} on drive "
                f"{a.params['drive']} of VM {a.params['vm']}"
            ),
            "give each snapshot of one drive its own name",
        )

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        try:
            self._per_vm_cmd(
                actions,
                ctx,
                lambda group: (
                    "transaction",
                    {
                        "actions": [
                            {
                                "type": "blockdev-snapshot-internal-sync",
                                "data": {"device": a.undo["node"], "name": a.params["name"]},
                            }
                            for a in group
                        ]
                    },
                ),
                record="made",
            )
        finally:
            # What QEMU answered is durable at once (one write for every VM), not at the
            # end of the phase: a run killed later in do (another type's step) leaves
            # snapshots that recover can prove are its own. Only a kill between QEMU's
            # answer and this write leaves one "maybe blktx's", reported.
            answered = [a for a in actions if "made" in a.undo]
            try:
                self._identify([a for a in answered if a.undo["made"] is True], ctx)
            finally:
                if answered:
                    ctx.remember(answered)

    def _identify(self, made: list[Action], ctx: RunContext) -> None:
        """Record the id and date of each snapshot QEMU made (one ``query-block`` per
        VM, all at once): the identity cancel and the catalog go by. Best effort: a
        VM that does not answer leaves them unknown, and cancel goes by name."""
        vms = [(c, g) for c, g in self._vms(made, ctx) if isinstance(c, Qmp)]
        for (conn, group), blocks in zip(vms, gather([(c, "query-block", None) for c, _ in vms], _budget(ctx)), strict=True):
            for a in [] if isinstance(blocks, BaseException) else group:
                try:
                    new = self._new(a, resolve(conn, a.undo["node"], blocks, _budget(ctx))["snapshots"])
                except Exception:  # noqa: BLE001 - unknown identity: cancel judges by name and the ids before
                    continue
                if len(new) == 1:
                    a.undo["id"], a.undo["date"] = new[0].id, list(new[0].date)

    def _new(self, a: Action, snapshots: list[Snapshot]) -> list[Snapshot]:
        """The snapshots of this action's name that were not there at the check."""
        before = set(a.undo.get("before", []))
        return [s for s in snapshots if s.name == a.params["name"] and s.id not in before]

    def _judge(self, a: Action, snapshots: list[Snapshot]) -> tuple[list[Snapshot], list[Snapshot]]:
        """(the snapshot this action provably made, those it may have made).

        QEMU refused the VM's transaction: none (one of that name that appeared
        after the check is somebody else's). QEMU did it: the one with the id and
        date recorded after its answer (gone: a cancel already ran); without them,
        the one of that name that was not there at the check (QMP refuses a second
        of one name while it exists). Unknown (the VM or blktx died during do): a
        new one of that name cannot be told from one made by hand since, so it is
        left and reported."""
        made = a.undo.get("made")
        if made is False:
            return [], []
        if made is True and "id" in a.undo and "date" in a.undo:
            mine = Snapshot(a.undo["id"], a.params["name"], (a.undo["date"][0], a.undo["date"][1]))
            return [s for s in snapshots if same(mine, s)], []
        new = self._new(a, snapshots)
        return (new, []) if made is True else ([], new)

    def _unsure(self, a: Action, unsure: list[Snapshot]) -> ActionFailed:
        listed = ", ".join(f"snapshot {s.name!r} (id {s.id})" for s in unsure)
        # The VM's own QEMU holds the image's lock all along, so unlike qcow2.* no lock
        # and heartbeat can date who made it: only QEMU's journaled answer proves it.
        return ActionFailed(
            f"left {listed} of {a.undo.get('file')}: QEMU's answer to the snapshot transaction never "
            f"reached the journal (the VM or blktx died during do), and it cannot be proven "
            f"to be blktx's rather than made since. If it is blktx's, delete it by hand (QMP "
            f"blockdev-snapshot-delete-internal-sync, or qemu-img snapshot -d ID with the VM off) "
            f"and run blktx recover again"
        )

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        def send(conn: Qmp, group: list[Action]) -> None:
            unsure: dict[int, BaseException] = {}
            blocks = conn.cmd("query-block", timeout=_budget(ctx))  # once per VM: ids are not reused here
            for a in group:
                ours, maybe = self._judge(a, resolve(conn, a.undo["node"], blocks, _budget(ctx))["snapshots"])
                for s in ours:
                    conn.cmd(
                        "blockdev-snapshot-delete-internal-sync",
                        {"device": a.undo["node"], "id": s.id, "name": s.name},
                        timeout=_budget(ctx),
                    )
                if maybe:
                    unsure[a.index] = self._unsure(a, maybe)
            if unsure:
                raise ActionFailures(unsure)

        failures: dict[int, BaseException] = {}
        try:
            self._per_vm(actions, ctx, send)
        except ActionFailures as exc:
            failures = exc.failures
        for a in actions:  # a dead VM's image is undone offline once QEMU's lock is gone
            if isinstance(failures.get(a.index), VmGone) and not isinstance(failures.get(a.index), MonitorBusy):
                try:
                    self._cancel_offline(a, ctx)
                    del failures[a.index]
                except Exception as exc:  # noqa: BLE001 - still a leftover, with the reason
                    failures[a.index] = ActionFailed(f"{failures[a.index]}; offline undo failed: {exc}")
        if failures:
            raise ActionFailures(failures)

    def _cancel_offline(self, a: Action, ctx: RunContext) -> None:
        image = _offline_image(a, ctx)
        for _ in range(50):
            if not holder(image):
                break
            time.sleep(0.1)
        _, snaps, _ = read_header(image)
        made, maybe = self._judge(a, snaps)
        if made:
            ident = a.undo.get("file_ident")
            daemon = StorageDaemon([image], ctx.txid, {image: ident} if isinstance(ident, list) else None)
            try:
                for s in made:
                    daemon.cmd(
                        "blockdev-snapshot-delete-internal-sync", {"device": daemon.node[image], "id": s.id, "name": s.name}
                    )
            finally:
                daemon.close()
        if maybe:
            raise self._unsure(a, maybe)

    def leftovers(self, action: Action) -> list[Leftover]:
        try:
            if not action.undo.get("file_real"):
                raise Refused("outside the roots")
            _, snaps, _ = read_header(action.undo["file_real"])
        except Exception:  # noqa: BLE001 - name what we know
            return [Leftover(action.target, f"maybe snapshot {action.params['name']!r} in {action.undo.get('file')}")]
        ours, maybe = self._judge(action, snaps)
        return [Leftover(action.target, f"snapshot {s.name!r} (id {s.id}) in {action.undo['file']}") for s in ours] + [
            Leftover(action.target, f"maybe blktx's: snapshot {s.name!r} (id {s.id}) in {action.undo['file']}") for s in maybe
        ]


class InternalDelete(_QmpType):
    """Delete an internal snapshot of a running VM's drive (finalize: after the commit point).

    The snapshot is named by ``id``, ``name`` or both, as QMP's
    ``blockdev-snapshot-delete-internal-sync`` takes it, and optionally by its
    ``date``. Check records the one it found (id, name, date); do re-reads the
    drive and deletes it by id and name only while that id still has that name and
    date (gone: a retry, done).
    """

    name = "qmp.internal-delete"
    finalize = True
    shares_target = True
    params = (
        *_COMMON,
        Param("name", "str", default="", doc="the snapshot's name"),
        Param("id", "str", default="", doc="the snapshot's id (needed when several share the name)"),
        Param(
            "date",
            "str",
            default="",
            doc='the snapshot\'s creation time, "SEC.NSEC" (date-sec, a dot, date-nsec as nine digits, as '
            "query-block reports them): a snapshot with that id but another date is refused",
        ),
    )

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        p = action.params
        where = f"drive {p['drive']} of VM {p['vm']}"
        found = pick(info["snapshots"], p["id"], p["name"], p["date"], where)
        action.undo["id"], action.undo["name"], action.undo["date"] = found.id, found.name, list(found.date)

    def _check_group(self, actions: list[Action]) -> dict[int, BaseException]:
        return twice(
            actions,
            lambda a: (a.target, a.undo["id"]),
            lambda first, a: (
                f"conflicts with action #{first.index}: actions #{first.index} and #{a.index} both delete snapshot "
                f"{shown(a.undo['name'])} (id {bare(a.undo['id'])}) of drive {a.params['drive']} of VM {a.params['vm']}"
            ),
            "delete each snapshot once",
        )

    def do(self, action: Action, ctx: RunContext) -> None:
        conn = self._conn(action, ctx)
        date = action.undo.get("date") or [0, 0]  # an older journal: id and name only
        mine = Snapshot(action.undo["id"], action.undo.get("name", action.params["name"]), (date[0], date[1]))
        # gone already (a retry): done; never another point in time that took its id
        if any(same(mine, s) for s in resolve(conn, action.undo["node"])["snapshots"]):
            conn.cmd("blockdev-snapshot-delete-internal-sync", {"device": action.undo["node"], "id": mine.id, "name": mine.name})


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    from blktx_plugins._qmp_external import ExternalCreate

    for cls in (InternalCreate, InternalDelete, ExternalCreate):
        register(cls)
