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

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from blktx import Action, ActionFailed, ActionFailures, ActionType, Hold, Leftover, Param, Refused, RunContext, hookimpl
from blktx_plugins._qemu import (
    Qmp,
    StorageDaemon,
    VmGone,
    create_overlay,
    gather,
    holder,
    overlay_is_ours,
    read_header,
    run_async,
)


class _Connections:
    """A run's QMP connections, one per VM, opened together when first needed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open: dict[str, Qmp] = {}

    def many(self, addresses: Sequence[str]) -> dict[str, Qmp | VmGone]:
        failed: dict[str, VmGone] = {}
        with self._lock:
            missing = [a for a in dict.fromkeys(addresses) if a not in self.open]
            for address, got in (Qmp.open_many(missing) if missing else {}).items():
                if isinstance(got, Qmp):
                    self.open[address] = got
                else:
                    failed[address] = got
        return {a: self.open.get(a) or failed[a] for a in addresses}

    def close(self) -> None:
        for conn in self.open.values():
            conn.close()


def _connections(ctx: RunContext) -> _Connections:
    def make() -> _Connections:
        conns = _Connections()
        ctx.on_close(conns.close)
        return conns

    return ctx.resource("qmp", make)


def connection(ctx: RunContext, address: str) -> Qmp:
    got = _connections(ctx).many([address])[address]
    if isinstance(got, VmGone):
        raise got
    return got


def _address(value: str, base_dir: str) -> str:
    return value if value.startswith("tcp:") else os.path.normpath(os.path.join(base_dir, value))


def _node_info(node: str, inserted: dict[str, Any]) -> dict[str, Any]:
    return {"node": node, "file": inserted["file"], "format": inserted["drv"],
            "size": inserted["image"]["virtual-size"],
            "snapshots": [(s["id"], s["name"]) for s in inserted["image"].get("snapshots", [])]}


def resolve(conn: Qmp, drive: str, blocks: list[Any] | None = None) -> dict[str, Any]:
    """The node behind ``drive``: its node name, image file, format and snapshots.

    ``blocks`` is the VM's ``query-block`` reply, when the caller already has it; a
    drive's active node is found there, any other node in ``query-named-block-nodes``.
    """
    for dev in conn.cmd("query-block") if blocks is None else blocks:
        inserted = dev.get("inserted")
        if inserted and drive in (dev.get("device"), dev.get("qdev"), inserted.get("node-name")):
            return _node_info(inserted["node-name"], inserted)
    for info in conn.cmd("query-named-block-nodes", {"flat": True}):
        if info["node-name"] == drive:
            return _node_info(drive, info)
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

    def _vms(self, actions: Sequence[Action], ctx: RunContext) -> list[tuple[Qmp | VmGone, list[Action]]]:
        """Each VM's connection (or why there is none) with its share of ``actions``."""
        groups: dict[str, list[Action]] = {}
        for a in actions:
            groups.setdefault(_address(a.params["vm"], ctx.base_dir), []).append(a)
        conns = _connections(ctx).many(list(groups))
        return [(conns[address], group) for address, group in groups.items()]

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Query every VM once (all at once), then check each action against that."""
        failures: dict[int, BaseException] = {}
        vms = self._vms(actions, ctx)
        live = [(c, g) for c, g in vms if isinstance(c, Qmp)]
        for conn, group in vms:
            if isinstance(conn, VmGone):
                refusal = Refused(str(conn), hint="is the VM running, and is its -qmp socket at that path?")
                failures.update({a.index: refusal for a in group})
        for (conn, group), blocks in zip(live, gather([(c, "query-block", None) for c, _ in live]), strict=True):
            for a in group:
                try:
                    if isinstance(blocks, BaseException):
                        raise blocks
                    info = resolve(conn, a.params["drive"], blocks)
                    a.undo.update({"node": info["node"], "file": info["file"], "format": info["format"],
                                   "size": info["size"], "before": [i for i, _ in info["snapshots"]]})
                    self._check(a, info)
                except Exception as exc:  # noqa: BLE001 - a refusal of this action
                    failures[a.index] = exc
        if failures:
            raise ActionFailures(failures)

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        return None

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
            with ThreadPoolExecutor(max_workers=min(len(vms), 32), thread_name_prefix="blktx-qmp") as pool:
                list(pool.map(lambda vm: one(*vm), vms))
        if failures:
            raise ActionFailures(failures)

    def _per_vm_cmd(self, actions: Sequence[Action], ctx: RunContext, build: Any) -> None:
        """Send each VM one command, ``build(group)`` = (name, args), to all VMs at
        once from one loop: the VMs' commands leave together, not one thread apart."""
        failures: dict[int, BaseException] = {}
        vms = self._vms(actions, ctx)
        live = [(c, g) for c, g in vms if isinstance(c, Qmp)]
        for conn, group in vms:
            if isinstance(conn, VmGone):
                failures.update({a.index: conn for a in group})
        replies = gather([(c, *build(g)) for c, g in live])
        for (_, group), reply in zip(live, replies, strict=True):
            if isinstance(reply, BaseException):
                failures.update({a.index: reply for a in group})
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
        self._per_vm_cmd(actions, ctx, lambda group: ("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync",
             "data": {"device": a.undo["node"], "name": a.params["name"]}} for a in group]}))

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
        self._per_vm_cmd(actions, ctx, lambda group: ("transaction", {"actions": [
            {"type": "blockdev-snapshot", "data": {"node": a.undo["node"], "overlay": a.undo["overlay_node"]}}
            for a in group]}))

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
    got = _connections(ctx).many(addresses)  # connect first: outside every window
    gone = [c for c in got.values() if isinstance(c, VmGone)]
    if gone:
        raise gone[0]
    conns = [cast(Qmp, got[a]) for a in addresses]

    # Only running VMs are paused (and later resumed); a paused one stays paused.
    statuses = gather([(c, "query-status", None) for c in conns])
    for status in statuses:
        if isinstance(status, BaseException):
            raise status
    running = [c for c, status in zip(conns, statuses, strict=True) if status["running"]]
    holds = [Hold("qmp.pause", f"vm:{c.address}", {"address": c.address}) for c in running]
    ctx.holding(holds)  # journaled before any VM is stopped

    async def pause(conn: Qmp, hold: Hold) -> None:
        hold.start = time.monotonic()
        await conn.execute("stop")

    async def pause_all() -> list[Any]:  # every stop leaves the one loop together
        return await asyncio.gather(*(pause(c, h) for c, h in zip(running, holds, strict=True)),
                                    return_exceptions=True)

    for failed in run_async(pause_all()):
        if isinstance(failed, BaseException):
            raise failed  # the executor resumes every hold announced above
    return holds


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    if hold.kind != "qmp.pause":
        return None
    try:
        # `cont` on a VM that runs already changes nothing: no query first, the
        # window ends one round trip sooner.
        connection(ctx, hold.data["address"]).cmd("cont")
    except VmGone:
        return True  # a dead VM has nothing left to resume
    return True


@hookimpl
def blktx_resume_many(ctx: RunContext, holds: list[Hold]) -> list[Hold] | None:
    """Continue every paused VM at once: all ``cont`` commands leave one loop together."""
    ours = [h for h in holds if h.kind == "qmp.pause"]
    if not ours:
        return None
    got = _connections(ctx).many([h.data["address"] for h in ours])

    async def resume(hold: Hold) -> None:
        conn = got[hold.data["address"]]
        if isinstance(conn, Qmp):
            try:
                await conn.execute("cont")
            except VmGone:
                pass  # a dead VM has nothing left to resume
        hold.end = time.monotonic()

    async def resume_all() -> list[Any]:
        return await asyncio.gather(*(resume(h) for h in ours), return_exceptions=True)

    # A VM whose `cont` failed is left to blktx_resume, which reports it.
    return [h for h, failed in zip(ours, run_async(resume_all()), strict=True) if failed is None]
