"""``qmp.external-create``: a new overlay for a running VM's drive, and the switch
of the drive to it, kept across a restart of the VM when asked.

The switch (``blockdev-snapshot``) lives in the running QEMU only: a VM restarted
with its old ``-drive file=IMAGE`` boots IMAGE again, without what the guest wrote
since. With ``device`` -- a symlink the VM's ``-drive`` opens, pointing to the
drive's image -- invalidate re-points that symlink to the overlay right after the
switch, the way ``qcow2.external-create`` does (compare and swap: a new symlink
under a private name, ``rename(2)`` over the device, only while the device still
says what the check read); cancel re-points it back only while it still points to
this run's overlay (by the overlay's inode). Without ``device`` the committed
result carries a warning saying so.

The module is part of the ``qmp`` plugin (which registers its type).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, Leftover, Param, Refused, RunContext
from blktx.states import INVALIDATED
from blktx_plugins._fs import DeviceLink, Private, is_ours, private_file, publish, remove_if_ours
from blktx_plugins._image import has_protocol, shown
from blktx_plugins._qemu import Qmp, VmGone, create_overlay, gather
from blktx_plugins._qmp_monitor import MonitorBusy
from blktx_plugins._qmp_window import _connections
from blktx_plugins.qmp import _COMMON, _QmpType


class ExternalCreate(DeviceLink, _QmpType):
    """Create an overlay file for a running VM's drive and switch the drive to it."""

    # do makes the overlay file and node; only the switch (invalidate) needs the VM paused.
    do_before_quiesce = True

    name = "qmp.external-create"
    params = (
        *_COMMON,
        Param("overlay", "path", required=True, doc="the new overlay file; must not exist", creates=True),
        Param(
            "device",
            "path",
            doc="a symlink the VM's -drive opens, pointing to the drive's image: re-pointed to the overlay with the "
            "switch, so a restart boots the new image (without it, a restart with the old -drive boots the old image)",
        ),
    )

    def _check(self, action: Action, info: dict[str, Any]) -> None:
        if os.path.lexists(action.params["overlay"]):
            raise Refused(f"overlay {action.params['overlay']} already exists", hint="choose a new name")
        file = info["file"]
        if action.params.get("device") and file.startswith("json:"):
            file = _top_file(file) or file  # switched before with a device, not restarted since
        if has_protocol(file) or not file.startswith("/"):
            # the overlay names its backing file by what the VM opened: it must be a file
            raise Refused(
                f"drive {action.params['drive']} of VM {action.params['vm']} is opened as "
                f"{shown(info['file'])}, not a file path [rule confined-paths]: an overlay cannot name it"
            )
        action.undo["overlay_node"] = f"blktx{action.index}-{os.urandom(4).hex()}"
        action.undo["tmp"] = f"{action.params['overlay']}.blktx-{os.urandom(6).hex()}"
        if action.params.get("device"):
            self._check_device(action, {**info, "file": file})

    def _check_device(self, action: Action, info: dict[str, Any]) -> None:
        """The device must be a symlink to the very image the drive uses (the VM opened
        it, or its target); what it says now is what invalidate swaps."""
        device, drive, vm = action.params["device"], action.params["drive"], action.params["vm"]
        if not os.path.islink(device):
            raise Refused(
                f"device {device} is not a symlink",
                hint=f"start the VM with -drive file={device}, a symlink to the drive's image "
                f"(ln -s IMAGE {device}), so that a restart follows the switch",
            )
        current = os.path.realpath(device)
        if current != os.path.realpath(info["file"]):
            raise Refused(
                f"device {device} points to {current}, but drive {drive} of VM {vm} uses {info['file']}",
                hint="give the symlink the VM's -drive opens (it points to the drive's current image)",
            )
        folder = os.path.dirname(device)
        if not os.access(folder, os.W_OK):
            raise Refused(f"cannot re-point device {device}: its folder {folder} is not writable")
        action.undo.update({"link": os.readlink(device), "old": current, "swap": f"{device}.blktx-{os.urandom(6).hex()}"})

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Make every overlay file at once (``qemu-img`` processes side by side), then
        add each as a node of its VM, all VMs at once."""
        failures: dict[int, BaseException] = {}
        privates: dict[int, Private] = {}
        for a in actions:
            try:
                privates[a.index] = private_file(a.params["overlay"], a.undo["tmp"])
                a.undo["made"] = privates[a.index].ident
            except Exception as exc:  # noqa: BLE001 - this action's failure
                failures[a.index] = exc

        def make(a: Action) -> None:
            try:
                # size given: the backing file is locked by the running VM; QMP told its size.
                # With a device the overlay names the image itself, never the symlink
                # (which will point to the overlay: a loop).
                backing = a.undo["old"] if a.params.get("device") else a.undo["file"]
                create_overlay(privates[a.index], a.params["overlay"], backing, a.undo["format"], a.undo["size"], relative=False)
                try:
                    publish(privates[a.index], a.params["overlay"])
                except FileExistsError:
                    raise ActionFailed(f"overlay {a.params['overlay']} appeared after the check; it was left alone") from None
            except Exception as exc:  # noqa: BLE001 - this action's failure
                failures[a.index] = exc

        try:
            # Every overlay's identity is durable (one write) before any is published:
            # cancel removes a file at the overlay's name only if it is that inode.
            ctx.remember([a for a in actions if a.index in privates])
            from concurrent.futures import ThreadPoolExecutor  # here: not at every start

            with ThreadPoolExecutor(max_workers=min(len(actions), 8), thread_name_prefix="blktx-overlay") as pool:
                list(pool.map(make, [a for a in actions if a.index in privates]))
        finally:
            for private in privates.values():
                private.close()
        made = [a for a in actions if a.index not in failures]
        conns = _connections(ctx).many([a.params["vm"] for a in made])
        calls: list[tuple[Qmp, str, dict[str, Any] | None]] = []
        for a in made:
            conn = conns[a.params["vm"]]
            if isinstance(conn, VmGone):
                failures[a.index] = conn
                continue
            calls.append(
                (
                    conn,
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": a.undo["overlay_node"],
                        "file": {"driver": "file", "filename": a.params["overlay"]},
                        "backing": None,
                    },
                )
            )
        added = [a for a in made if a.index not in failures]
        for a, reply in zip(added, gather(calls), strict=True):
            if isinstance(reply, BaseException):
                failures[a.index] = reply
        if failures:
            raise ActionFailures(failures)

    def invalidate_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Switch every drive (one QMP ``transaction`` per VM, all VMs at once), then
        re-point the devices of the drives switched."""
        failures: dict[int, BaseException] = {}
        try:
            self._per_vm_cmd(
                actions,
                ctx,
                lambda group: (
                    "transaction",
                    {
                        "actions": [
                            {"type": "blockdev-snapshot", "data": {"node": a.undo["node"], "overlay": a.undo["overlay_node"]}}
                            for a in group
                        ]
                    },
                ),
            )
        except ActionFailures as exc:
            failures.update(exc.failures)
        for a in actions:
            if a.index in failures:
                continue
            try:
                if a.params.get("device"):
                    self._switch(a)
                else:
                    self._warn_at_close(a, ctx)
            except Exception as exc:  # noqa: BLE001 - this action's failure: the group rolls back
                failures[a.index] = exc
        if failures:
            raise ActionFailures(failures)

    def _warn_at_close(self, action: Action, ctx: RunContext) -> None:
        """Without a device: when the run ends committed, the result warns that a
        restart with the old -drive boots the old image (the run's close errors are
        its warnings)."""

        def warn() -> None:
            if action.state == INVALIDATED:  # committed: a rollback cancels it
                raise RestartWarning(
                    f"{self.name} action #{action.index}: drive {action.params['drive']} of VM {action.params['vm']} "
                    f"now writes to {action.params['overlay']}, but a restart of the VM with its old -drive boots "
                    f"{action.undo['file']} again, without what was written since: restart it on the overlay, or give "
                    "device = a symlink its -drive opens (docs/backends.md)"
                )

        ctx.on_close(warn)

    # -- undo ---------------------------------------------------------------------------------

    def cancel(self, action: Action, ctx: RunContext) -> None:
        """Unswitch the drive (merging what the guest wrote since into the old image),
        re-point the device back while it points to this run's overlay, then remove
        the overlay file if it is this run's."""
        if "node" not in action.undo:
            return
        try:
            conn = self._conn(action, ctx)
            self._unswitch(conn, action)
        except MonitorBusy:
            raise  # the VM lives: its drive may still use the overlay
        except VmGone:
            pass  # the switch lived in the dead QEMU's memory only; the file goes below
        if action.params.get("device") and "link" in action.undo:
            self._switch_back(action)
        remove_if_ours(action.params["overlay"], action.undo.get("made"))
        remove_if_ours(action.undo.get("tmp", ""), action.undo.get("made"))

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
        overlay = action.params["overlay"]
        if action.params.get("device") and "link" in action.undo:
            if self._points_to_ours(action):
                found.append(Leftover(action.target, f"device symlink {action.params['device']} points to the overlay {overlay}"))
            if os.path.islink(action.undo.get("swap", "")):
                found.append(Leftover(action.target, f"unfinished symlink {action.undo['swap']}"))
        if is_ours(overlay, action.undo.get("made")):
            found.append(Leftover(action.target, f"overlay file {overlay} (the drive may use it)"))
        return found


def _top_file(file: str) -> str | None:
    """The top image file of a chain QEMU names by a ``json:`` filename (as after a
    switch with a device: the overlay's header names the image, the running node was
    opened through the symlink), when it is a plain file; else None."""
    try:
        spec = json.loads(file[5:])
    except ValueError:
        return None
    top = spec.get("file") if isinstance(spec, dict) else None
    if isinstance(top, dict) and top.get("driver") == "file" and str(top.get("filename", "")).startswith("/"):
        return str(top["filename"])
    return None


class RestartWarning(Exception):
    """Raised by a closer of a committed run: its message becomes a warning of the result."""
