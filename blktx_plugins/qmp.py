"""``qmp``: snapshots of running VMs' drives over QMP, atomic per VM by QEMU and
across VMs (and other backends) by blktx.

VMs are named by their QMP address (a unix socket path, or ``tcp:host:port``);
drives by block-backend name, qdev id or node name. All actions of one type on
one VM go to that VM as one QMP ``transaction``. With ``quiesce = "pause"`` every
running VM of the transaction is stopped before the do phase and continued right
after the commit point or the rollback; a VM that was already paused stays
paused. If a VM dies during the transaction the rest of the group rolls back,
and its own actions are undone offline on its image files once QEMU's lock is
gone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Hold, Leftover, Param, Refused, RunContext, hookimpl
from blktx_plugins._qemu import Qmp, StorageDaemon, VmGone, create_overlay, holder, overlay_is_ours, read_header


def connection(ctx: RunContext, address: str) -> Qmp:
    def open_it() -> Qmp:
        conn = Qmp(address)
        ctx.on_close(conn.close)
        return conn

    return ctx.resource(f"qmp:{address}", open_it)


def _address(value: str, base_dir: str) -> str:
    return value if value.startswith("tcp:") else os.path.normpath(os.path.join(base_dir, value))


def resolve(conn: Qmp, drive: str, tables: tuple[list[Any], list[Any]] | None = None) -> dict[str, Any]:
    """The node behind ``drive``: its node name, image file, format and snapshots.

    ``tables`` are the VM's ``query-block`` and ``query-named-block-nodes`` replies,
    when the caller already has them.
    """
    blocks, nodes = tables or (conn.cmd("query-block"), conn.cmd("query-named-block-nodes", {"flat": True}))
    node = drive
    for dev in blocks:
        if drive in (dev.get("device"), dev.get("qdev")) and dev.get("inserted"):
            node = dev["inserted"]["node-name"]
    for info in nodes:
        if info["node-name"] == node:
            return {"node": node, "file": info["file"], "format": info["drv"],
                    "size": info["image"]["virtual-size"],
                    "snapshots": [(s["id"], s["name"]) for s in info["image"].get("snapshots", [])]}
    raise Refused(f"VM {conn.address} has no drive or node {drive!r}",
                  hint="`query-block` lists the drives, `query-named-block-nodes` the nodes")


_COMMON = (
    Param("vm", "str", required=True, doc="the VM's QMP address: a unix socket path or tcp:host:port"),
    Param("drive", "str", required=True, doc="the drive: block-backend name, qdev id or node name"),
)


class _QmpType(ActionType):
    shares_target = False

    def target(self, action: Action) -> str:
        return f"vm:{action.params['vm']}/{action.params['drive']}"

    def _conn(self, action: Action, ctx: RunContext) -> Qmp:
        return connection(ctx, _address(action.params["vm"], ctx.base_dir))

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Query each VM once (all VMs at once), then check every action against that."""
        failures: dict[int, BaseException] = {}

        def one(group: list[Action]) -> None:
            try:
                conn = self._conn(group[0], ctx)
                tables = (conn.cmd("query-block"), conn.cmd("query-named-block-nodes", {"flat": True}))
            except VmGone as exc:
                refusal = Refused(str(exc), hint="is the VM running, and is its -qmp socket at that path?")
                failures.update({a.index: refusal for a in group})
                return
            except Exception as exc:  # noqa: BLE001 - refuses every action on that VM
                failures.update({a.index: exc for a in group})
                return
            for a in group:
                try:
                    info = resolve(conn, a.params["drive"], tables)
                    a.undo.update({"node": info["node"], "file": info["file"], "format": info["format"],
                                   "size": info["size"], "before": [i for i, _ in info["snapshots"]]})
                    self._check(a, info)
                except Exception as exc:  # noqa: BLE001 - a refusal of this action
                    failures[a.index] = exc

        groups = list(self._by_vm(actions).values())
        with ThreadPoolExecutor(max_workers=max(1, min(len(groups), 32)), thread_name_prefix="blktx-qmp") as pool:
            list(pool.map(one, groups))
        if failures:
            raise ActionFailures(failures)

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        return None

    @staticmethod
    def _by_vm(actions: Sequence[Action]) -> dict[str, list[Action]]:
        groups: dict[str, list[Action]] = {}
        for a in actions:
            groups.setdefault(a.params["vm"], []).append(a)
        return groups

    def _per_vm(self, actions: Sequence[Action], ctx: RunContext, send: Any) -> None:
        """Send each VM's share of a batch, to all VMs at once so that no VM's pause
        window waits for another's; a VM that fails fails only its own actions."""
        failures: dict[int, BaseException] = {}

        def one(group: list[Action]) -> None:
            try:
                send(self._conn(group[0], ctx), group)
            except ActionFailures as exc:
                failures.update(exc.failures)
            except Exception as exc:  # noqa: BLE001 - reported for each action of that VM
                failures.update({a.index: exc for a in group})

        groups = list(self._by_vm(actions).values())
        if len(groups) == 1:
            one(groups[0])
        else:
            with ThreadPoolExecutor(max_workers=min(len(groups), 32), thread_name_prefix="blktx-qmp") as pool:
                list(pool.map(one, groups))
        if failures:
            raise ActionFailures(failures)


class InternalCreate(_QmpType):
    """Create an internal snapshot of a running VM's drive (one QMP transaction per VM)."""

    name = "qmp.internal-create"
    params = (*_COMMON, Param("name", "str", required=True, doc="the snapshot's name"))

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        same = [i for i, n in info["snapshots"] if n == action.params["name"]]
        if same:
            raise Refused(f"drive {action.params['drive']} of VM {action.params['vm']} already has a snapshot named "
                          f"{action.params['name']!r} (id {', '.join(same)})")
        if info["format"] != "qcow2":
            raise Refused(f"drive {action.params['drive']} is {info['format']}, not qcow2: no internal snapshots")

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        def send(conn: Qmp, group: list[Action]) -> None:
            conn.cmd("transaction", {"actions": [
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": a.undo["node"], "name": a.params["name"]}} for a in group]})

        self._per_vm(actions, ctx, send)

    def _made(self, a: Action, snapshots: list[tuple[str, str]]) -> list[tuple[str, str]]:
        before = set(a.undo.get("before", []))
        return [(i, n) for i, n in snapshots if n == a.params["name"] and i not in before]

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        def send(conn: Qmp, group: list[Action]) -> None:
            for a in group:
                for sid, name in self._made(a, resolve(conn, a.undo["node"])["snapshots"]):
                    conn.cmd("blockdev-snapshot-delete-internal-sync", {"device": a.undo["node"], "id": sid, "name": name})

        failures: dict[int, BaseException] = {}
        try:
            self._per_vm(actions, ctx, send)
        except ActionFailures as exc:
            failures = exc.failures
        for a in actions:  # a dead VM's image is undone offline once QEMU's lock is gone
            if isinstance(failures.get(a.index), VmGone):
                try:
                    self._cancel_offline(a)
                    del failures[a.index]
                except Exception as exc:  # noqa: BLE001 - still a leftover, with the reason
                    failures[a.index] = ActionFailed(f"{failures[a.index]}; offline undo failed: {exc}")
        if failures:
            raise ActionFailures(failures)

    def _cancel_offline(self, a: Action) -> None:
        image = a.undo["file"]
        for _ in range(50):
            if not holder(image):
                break
            time.sleep(0.1)
        _, snaps, _ = read_header(image)
        made = self._made(a, [(s.id, s.name) for s in snaps])
        if made:
            daemon = StorageDaemon([image])
            try:
                for sid, name in made:
                    daemon.cmd("blockdev-snapshot-delete-internal-sync",
                               {"device": daemon.node[image], "id": sid, "name": name})
            finally:
                daemon.close()

    def leftovers(self, action: Action) -> list[Leftover]:
        try:
            _, snaps, _ = read_header(action.undo["file"])
        except Exception:  # noqa: BLE001 - name what we know
            return [Leftover(action.target, f"maybe snapshot {action.params['name']!r} in {action.undo.get('file')}")]
        return [Leftover(action.target, f"snapshot {n!r} (id {i}) in {action.undo['file']}")
                for i, n in self._made(action, [(s.id, s.name) for s in snaps])]


class InternalDelete(_QmpType):
    """Delete an internal snapshot of a running VM's drive (finalize: after the commit point)."""

    name = "qmp.internal-delete"
    finalize = True
    params = (*_COMMON, Param("name", "str", required=True, doc="the snapshot's name"))

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        found = [(i, n) for i, n in info["snapshots"] if n == action.params["name"]]
        if len(found) != 1:
            raise Refused(f"drive {action.params['drive']} of VM {action.params['vm']} has {len(found)} snapshots "
                          f"named {action.params['name']!r}; exactly one is needed")
        action.undo["id"] = found[0][0]

    def do(self, action: Action, ctx: RunContext) -> None:
        conn = self._conn(action, ctx)
        if (action.undo["id"], action.params["name"]) in resolve(conn, action.undo["node"])["snapshots"]:
            conn.cmd("blockdev-snapshot-delete-internal-sync",
                     {"device": action.undo["node"], "id": action.undo["id"], "name": action.params["name"]})


class ExternalCreate(_QmpType):
    """Create an overlay file for a running VM's drive and switch the drive to it."""

    name = "qmp.external-create"
    params = (*_COMMON, Param("overlay", "path", required=True, doc="the new overlay file; must not exist"))

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        if os.path.lexists(action.params["overlay"]):
            raise Refused(f"overlay {action.params['overlay']} already exists", hint="choose a new name")
        action.undo["overlay_node"] = f"blktx{action.index}-{secrets.token_hex(4)}"
        action.undo["tmp"] = f"{action.params['overlay']}.blktx-{secrets.token_hex(6)}"

    def do(self, action: Action, ctx: RunContext) -> None:
        overlay = action.params["overlay"]
        # size given: the backing file is locked by the running VM; QMP told its size.
        create_overlay(overlay, action.undo["tmp"], action.undo["file"], action.undo["format"], action.undo["size"],
                       relative=False)
        action.undo["created"] = True
        self._conn(action, ctx).cmd("blockdev-add", {
            "driver": "qcow2", "node-name": action.undo["overlay_node"],
            "file": {"driver": "file", "filename": overlay}, "backing": None})

    def invalidate_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        def send(conn: Qmp, group: list[Action]) -> None:
            conn.cmd("transaction", {"actions": [
                {"type": "blockdev-snapshot", "data": {"node": a.undo["node"], "overlay": a.undo["overlay_node"]}}
                for a in group]})

        self._per_vm(actions, ctx, send)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if "node" not in action.undo:
            return
        try:
            conn = self._conn(action, ctx)
            self._unswitch(conn, action)
        except VmGone:
            pass  # the switch lived in the dead QEMU's memory only; the file goes below
        overlay, tmp = action.params["overlay"], action.undo.get("tmp", "")
        if overlay_is_ours(overlay, tmp, bool(action.undo.get("created")), action.undo["file"]):
            os.unlink(overlay)
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a name only this transaction uses

    def _unswitch(self, conn: Qmp, action: Action) -> None:
        top, base = action.undo["overlay_node"], action.undo["node"]
        nodes = {n["node-name"]: n for n in conn.cmd("query-named-block-nodes", {"flat": True})}
        if top not in nodes:
            return
        if nodes[top].get("backing_file"):
            # Switched: merge whatever the guest wrote into the old image, then pivot back.
            job = f"blktx-undo-{action.index}"
            conn.cmd("block-commit", {"job-id": job, "device": top, "base-node": base})
            self._wait_job(conn, job, ready=True)
            conn.cmd("job-complete", {"id": job})
            self._wait_job(conn, job, ready=False)
        conn.cmd("blockdev-del", {"node-name": top})

    @staticmethod
    def _wait_job(conn: Qmp, job: str, ready: bool) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = {j["device"]: j for j in conn.cmd("query-block-jobs")}
            if (ready and jobs.get(job, {}).get("ready")) or (not ready and job not in jobs):
                return
            time.sleep(0.005)
        raise ActionFailed(f"VM {conn.address}: block job {job} did not finish in 120 s")

    def leftovers(self, action: Action) -> list[Leftover]:
        found = []
        overlay, tmp = action.params["overlay"], action.undo.get("tmp", "")
        if overlay_is_ours(overlay, tmp, bool(action.undo.get("created")), action.undo.get("file", "")):
            found.append(Leftover(action.target, f"overlay file {overlay} (the drive may use it)"))
        return found


@hookimpl
def blktx_register_action_types(register: Any) -> None:
    for cls in (InternalCreate, InternalDelete, ExternalCreate):
        register(cls)


@hookimpl
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> list[Hold]:
    """Stop every running VM of the transaction; leave paused ones as they are."""
    if ctx.options.quiesce != "pause":
        return []
    addresses = sorted({_address(a.params["vm"], ctx.base_dir) for a in actions if a.type.name.startswith("qmp.")})
    conns = [connection(ctx, address) for address in addresses]  # connect first: outside every window

    # Only running VMs are paused (and later resumed); a paused one stays paused.
    running = [c for c in conns if c.cmd("query-status")["running"]]
    holds = {c.address: Hold("qmp.pause", f"vm:{c.address}", {"address": c.address}) for c in running}
    ctx.holding(list(holds.values()))  # journaled before any VM is stopped

    def pause(conn: Qmp) -> Hold:
        hold = holds[conn.address]
        hold.start = time.monotonic()
        conn.cmd("stop")
        return hold

    with ThreadPoolExecutor(max_workers=max(1, min(len(running), 32)), thread_name_prefix="blktx-qmp") as pool:
        return list(pool.map(pause, running))


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    if hold.kind != "qmp.pause":
        return None
    address = hold.data["address"]
    try:
        conn = connection(ctx, address)
        if not conn.cmd("query-status")["running"]:
            conn.cmd("cont")
    except VmGone:
        return True  # a dead VM has nothing left to resume
    return True
