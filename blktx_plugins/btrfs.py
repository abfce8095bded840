"""``btrfs``: subvolume snapshots with btrfs-progs.

``btrfs.snapshot`` makes a read-only (default) or writable snapshot of a
subvolume; its cancel deletes only the snapshot it made (checked by the
snapshot's parent UUID). ``btrfs.delete`` deletes a subvolume after the commit
point (finalize).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, RunContext, hookimpl


def btrfs(*args: str) -> str:
    exe = shutil.which("btrfs")
    if exe is None:
        raise ActionFailed("btrfs is not installed (Debian package btrfs-progs)")
    out = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ActionFailed(f"btrfs {' '.join(args[:2])}: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def subvolume_info(path: str) -> dict[str, str] | None:
    """``btrfs subvolume show`` as a dict, or None when ``path`` is not a subvolume."""
    if not os.path.isdir(path) or os.stat(path).st_ino != 256:  # every subvolume root is inode 256
        return None
    try:
        out = btrfs("subvolume", "show", path)
    except ActionFailed:
        return None
    info = {}
    for line in out.splitlines()[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


class Snapshot(ActionType):
    """Snapshot a btrfs subvolume (read-only unless readonly = false)."""

    name = "btrfs.snapshot"
    params = (
        Param("source", "path", required=True, doc="the subvolume to snapshot"),
        Param("dest", "path", required=True, doc="where the snapshot appears; must not exist"),
        Param("readonly", "bool", default=True, doc="make a read-only snapshot"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["dest"])

    def check(self, action: Action, ctx: RunContext) -> None:
        source, dest = action.params["source"], action.params["dest"]
        info = subvolume_info(source)
        if info is None:
            raise Refused(f"{source} is not a btrfs subvolume",
                          hint="create it with `btrfs subvolume create`; a plain directory cannot be snapshotted")
        if os.path.lexists(dest):
            raise Refused(f"{dest} already exists", hint="choose a new destination")
        if not os.path.isdir(os.path.dirname(dest)):
            raise Refused(f"{os.path.dirname(dest)} does not exist")
        action.undo["source_uuid"] = info.get("UUID", "")

    def do(self, action: Action, ctx: RunContext) -> None:
        if os.path.lexists(action.params["dest"]):
            action.undo["blocked"] = True
            raise ActionFailed(f"{action.params['dest']} appeared after the check; it was left alone")
        args = ["subvolume", "snapshot", *(["-r"] if action.params["readonly"] else []),
                action.params["source"], action.params["dest"]]
        btrfs(*args)
        info = subvolume_info(action.params["dest"])
        action.undo["uuid"] = info.get("UUID", "") if info else ""

    def _ours(self, action: Action) -> bool:
        """The snapshot this action made: its own UUID when known, else a snapshot of the source."""
        if action.undo.get("blocked"):
            return False
        info = subvolume_info(action.params["dest"])
        if info is None:
            return False
        if action.undo.get("uuid"):
            return info.get("UUID") == action.undo["uuid"]
        return info.get("Parent UUID") == action.undo.get("source_uuid")

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if self._ours(action):
            btrfs("subvolume", "delete", action.params["dest"])

    def leftovers(self, action: Action) -> list[Leftover]:
        return [Leftover(action.target, f"btrfs snapshot {action.params['dest']}")] if self._ours(action) else []


class Delete(ActionType):
    """Delete a btrfs subvolume (finalize: runs after the commit point)."""

    name = "btrfs.delete"
    finalize = True
    params = (Param("path", "path", required=True, doc="the subvolume to delete"),)

    def target(self, action: Action) -> str:
        return str(action.params["path"])

    def check(self, action: Action, ctx: RunContext) -> None:
        info = subvolume_info(action.params["path"])
        if info is None:
            raise Refused(f"{action.params['path']} is not a btrfs subvolume")
        action.undo["uuid"] = info.get("UUID", "")

    def do(self, action: Action, ctx: RunContext) -> None:
        info = subvolume_info(action.params["path"])
        if info is None or info.get("UUID") != action.undo["uuid"]:
            return  # already deleted (a retry, or recover rolling forward)
        btrfs("subvolume", "delete", action.params["path"])



@hookimpl
def blktx_register_action_types(register: Any) -> None:
    register(Snapshot)
    register(Delete)
