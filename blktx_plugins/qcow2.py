"""``qcow2``: internal and external snapshots of qcow2 image files, offline.

Internal snapshots of a whole group are made by one ``qemu-storage-daemon`` that
opens every image of the transaction and runs one QMP ``transaction`` over them, so
QEMU itself makes them atomically; blktx keeps the all-or-none guarantee across
that and every other action. Checks read the qcow2 headers directly (no process,
read-only) and refuse an image that QEMU's image locking says is in use.

External snapshots keep the layout documented in docs/backends.md: ``device`` is a
stable symlink that users open; the new overlay's backing file is the image the
link points to, and invalidate re-points the link atomically (``rename(2)`` of a
new symlink over it). A ``blktx_switch_active_image`` hook can switch a management
stack's own configuration instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Leftover, Param, Refused, RunContext, hookimpl
from blktx_plugins._qemu import (
    Snapshot,
    StorageDaemon,
    VmGone,
    check_writable_image,
    create_overlay,
    holder,
    overlay_is_ours,
    qemu_img,
    read_header,
)


def _per_action(actions: Sequence[Action], step: Any) -> None:
    """Run ``step`` on each action, collecting failures the way the executor wants them."""
    failures: dict[int, BaseException] = {}
    for a in actions:
        try:
            step(a)
        except Exception as exc:  # noqa: BLE001 - reported per action
            failures[a.index] = exc
    if failures:
        raise ActionFailures(failures)


def _delete_snapshots(plan: dict[int, list[tuple[str, Snapshot]]], actions: Sequence[Action]) -> None:
    """Delete exactly the listed snapshots (by id and name) in one daemon."""
    images = sorted({image for todo in plan.values() for image, _ in todo})
    if not images:
        return
    for attempt in range(10):
        try:
            daemon = StorageDaemon(images)
            break
        except ActionFailed as exc:
            # A killed run's daemon may hold an image's lock for a moment more.
            if "lock" not in str(exc) or attempt == 9:
                raise
            time.sleep(0.3)
    failures: dict[int, BaseException] = {}
    try:
        for a in actions:
            for image, snap in plan.get(a.index, []):
                try:
                    daemon.cmd("blockdev-snapshot-delete-internal-sync",
                               {"device": daemon.node[image], "id": snap.id, "name": snap.name})
                except ActionFailed as exc:
                    failures[a.index] = ActionFailed(f"{image}: {exc}")
    finally:
        daemon.close()
    if failures:
        raise ActionFailures(failures)


class InternalCreate(ActionType):
    """Create a named internal snapshot in a qcow2 image (all images in one QEMU transaction)."""

    name = "qcow2.internal-create"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    shares_target = True
    params = (
        Param("image", "path", required=True, doc="the qcow2 image file"),
        Param("name", "str", required=True, doc="the snapshot's name"),
        Param("replace", "bool", default=False,
              doc="replace a snapshot of the same name: the old one is deleted only after the commit point"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["image"])

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        names: dict[tuple[str, str], int] = {}

        def check(a: Action) -> None:
            image, name = a.params["image"], a.params["name"]
            snaps = check_writable_image(image)
            same = [s for s in snaps if s.name == name]
            if same and not a.params["replace"]:
                raise Refused(f"{image} already has a snapshot named {name!r} (id {', '.join(s.id for s in same)})",
                              hint="set replace = true to replace it; the old one is deleted after the commit point")
            if (image, name) in names:
                raise Refused(f"action #{names[image, name]} already creates {name!r} in {image}")
            names[image, name] = a.index
            a.undo["before"] = [s.id for s in snaps]
            a.undo["old"] = [s.id for s in same]

        _per_action(actions, check)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        # QMP refuses a second snapshot of the same name, so a replacement is made with
        # qemu-img (which allows it); everything else in one daemon transaction.
        # undo["made"] records the ids made (none when QEMU refused: its transaction
        # is all or nothing), so that cancel never takes somebody else's snapshot of
        # the same name, made after the check, for this transaction's.
        fresh = [a for a in actions if not a.undo.get("old")]
        if fresh:
            try:
                daemon = StorageDaemon(sorted({a.params["image"] for a in fresh}))
            except Exception:
                for a in fresh:
                    a.undo["made"] = []
                raise
            try:
                daemon.cmd("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": daemon.node[a.params["image"]], "name": a.params["name"]}} for a in fresh]})
            except ActionFailed as exc:
                if not isinstance(exc, VmGone):  # refused, not died half-way
                    for a in fresh:
                        a.undo["made"] = []
                raise
            finally:
                daemon.close()
        for a in actions:
            if a.undo.get("old"):
                try:
                    qemu_img("snapshot", "-c", a.params["name"], a.params["image"])
                except ActionFailed:
                    a.undo["made"] = []
                    raise
            # qcow2 numbers a new snapshot one past the highest id: ours is the newest.
            a.undo["made"] = [s.id for s in self._candidates(a)[-1:]]

    def _candidates(self, a: Action) -> list[Snapshot]:
        """Snapshots of this action's name with an id that was not there at the check,
        oldest first."""
        before = set(a.undo.get("before", []))
        try:
            _, snaps, _ = read_header(a.params["image"])
        except Refused:
            return []
        found = [s for s in snaps if s.name == a.params["name"] and s.id not in before]
        return sorted(found, key=lambda s: (len(s.id), s.id))

    def _made(self, a: Action) -> list[Snapshot]:
        """The snapshots this action made: the ids do recorded; when do never told
        (blktx died inside it), every candidate."""
        found = self._candidates(a)
        if "made" in a.undo:
            return [s for s in found if s.id in a.undo["made"]]
        return found

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        plan = {a.index: [(a.params["image"], s) for s in self._made(a)] for a in actions}
        _delete_snapshots(plan, actions)

    def finish(self, action: Action, ctx: RunContext) -> None:
        old = set(action.undo.get("old", []))
        if not old:
            return
        _, snaps, _ = read_header(action.params["image"])
        todo = [(action.params["image"], s) for s in snaps if s.id in old and s.name == action.params["name"]]
        _delete_snapshots({action.index: todo}, [action])

    def leftovers(self, action: Action) -> list[Leftover]:
        return [Leftover(action.target, f"snapshot {s.name!r} (id {s.id})") for s in self._made(action)]


class InternalDelete(ActionType):
    """Delete an internal snapshot of a qcow2 image (finalize: runs after the commit point)."""

    name = "qcow2.internal-delete"
    finalize = True
    shares_target = True
    params = (
        Param("image", "path", required=True, doc="the qcow2 image file"),
        Param("name", "str", default="", doc="the snapshot's name"),
        Param("id", "str", default="", doc="the snapshot's id (needed when several share the name)"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["image"])

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        def check(a: Action) -> None:
            image, name, sid = a.params["image"], a.params["name"], a.params["id"]
            if not name and not sid:
                raise Refused("give the snapshot's name or id", hint='name = "..." or id = "..."')
            snaps = check_writable_image(image)
            found = [s for s in snaps if (not name or s.name == name) and (not sid or s.id == sid)]
            if not found:
                listed = ", ".join(f"{s.id}:{s.name}" for s in snaps) or "none"
                raise Refused(f"{image} has no snapshot {name or ''}{' id ' + sid if sid else ''} (it has: {listed})")
            if len(found) > 1:
                raise Refused(f"{image} has {len(found)} snapshots named {name!r} (ids {', '.join(s.id for s in found)})",
                              hint="give id = \"...\" to say which")
            if (image, found[0].id) in claimed:
                raise Refused(f"conflicts with action #{claimed[image, found[0].id]}: both delete snapshot "
                              f"{found[0].name!r} (id {found[0].id}) of {image}")
            claimed[image, found[0].id] = a.index
            a.undo["id"], a.undo["name"] = found[0].id, found[0].name

        claimed: dict[tuple[str, str], int] = {}
        _per_action(actions, check)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        plan: dict[int, list[tuple[str, Snapshot]]] = {}
        for a in actions:
            _, snaps, _ = read_header(a.params["image"])
            target = Snapshot(a.undo["id"], a.undo["name"])
            plan[a.index] = [(a.params["image"], target)] if target in snaps else []  # gone already: done
        _delete_snapshots(plan, actions)


def _format(path: str) -> str:
    with open(path, "rb") as fh:
        return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"


class ExternalCreate(ActionType):
    """Create a qcow2 overlay on top of a device's current image and make it the active image."""

    name = "qcow2.external-create"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    params = (
        Param("device", "path", required=True,
              doc="the stable symlink that users open; it points to the current image"),
        Param("overlay", "path", required=True, doc="the new overlay file to create"),
        Param("reuse", "bool", default=False,
              doc="use an existing overlay file whose backing file is the current image"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["device"])

    def check(self, action: Action, ctx: RunContext) -> None:
        device, overlay = action.params["device"], action.params["overlay"]
        if not os.path.islink(device):
            hint = (f"keep the image as a file and point a symlink at it: mv {device} {device}.base.qcow2 && "
                    f"ln -s {os.path.basename(device)}.base.qcow2 {device}") if os.path.exists(device) else "check the path"
            raise Refused(f"device {device} is not a symlink", hint=hint)
        current = os.path.realpath(device)
        if not os.path.exists(current):
            raise Refused(f"device {device} points to {current}, which does not exist")
        fmt = _format(current)
        if fmt == "qcow2":
            read_header(current)
        who = holder(current)
        if who:
            raise Refused(f"{current} is in use by {who}", hint="use qmp.external-create for a running VM")
        if os.path.realpath(overlay) == current:
            raise Refused("the overlay is the current image")
        exists = os.path.lexists(overlay)
        if exists and not action.params["reuse"]:
            raise Refused(f"overlay {overlay} already exists", hint="choose a new name, or set reuse = true to use it")
        if exists:
            _, _, backing = read_header(overlay)
            if backing is None or os.path.realpath(os.path.join(os.path.dirname(overlay), backing)) != current:
                raise Refused(f"overlay {overlay} is backed by {backing!r}, not by the current image {current}")
        elif not os.access(os.path.dirname(overlay), os.W_OK):
            raise Refused(f"cannot create files in {os.path.dirname(overlay)}")
        action.undo.update({"link": os.readlink(device), "old": current, "format": fmt, "preexisting": exists,
                            "tmp": f"{overlay}.blktx-{ctx.txid}"})

    def do(self, action: Action, ctx: RunContext) -> None:
        if action.undo["preexisting"]:
            return
        create_overlay(action.params["overlay"], action.undo["tmp"], action.undo["old"], action.undo["format"])
        action.undo["created"] = True

    def _ours(self, action: Action) -> bool:
        return not action.undo.get("preexisting", True) and overlay_is_ours(
            action.params["overlay"], action.undo.get("tmp", ""), bool(action.undo.get("created")),
            action.undo["old"])

    def _switch(self, action: Action, ctx: RunContext, old: str, new: str, link_text: str) -> None:
        device = action.params["device"]
        if ctx.hook is not None and ctx.hook.blktx_switch_active_image(
                ctx=ctx, action=action, device=device, old=old, new=new):
            return
        if os.path.realpath(device) == os.path.realpath(new):
            return
        tmp = f"{device}.blktx-switch"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(link_text, tmp)
        os.replace(tmp, device)
        dfd = os.open(os.path.dirname(device), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        overlay = action.params["overlay"]
        link = os.path.relpath(overlay, os.path.dirname(action.params["device"]))
        self._switch(action, ctx, action.undo["old"], overlay, link)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if "old" not in action.undo:
            return  # never checked: nothing was done
        overlay = action.params["overlay"]
        self._switch(action, ctx, overlay, action.undo["old"], action.undo["link"])
        switch = f"{action.params['device']}.blktx-switch"
        if os.path.islink(switch):
            os.unlink(switch)
        if self._ours(action):
            os.unlink(overlay)
        if os.path.lexists(action.undo.get("tmp", "")):
            os.unlink(action.undo["tmp"])  # a name only this transaction uses

    def leftovers(self, action: Action) -> list[Leftover]:
        found = []
        overlay, device = action.params["overlay"], action.params["device"]
        if os.path.realpath(device) == os.path.realpath(overlay):
            found.append(Leftover(action.target, f"device symlink points to the overlay {overlay}"))
        if self._ours(action):
            found.append(Leftover(action.target, f"overlay file {overlay}"))
        if os.path.lexists(action.undo.get("tmp", "")):
            found.append(Leftover(action.target, f"unfinished overlay file {action.undo['tmp']}"))
        return found


@hookimpl
def blktx_register_action_types(register: Any) -> None:
    for cls in (InternalCreate, InternalDelete, ExternalCreate):
        register(cls)
