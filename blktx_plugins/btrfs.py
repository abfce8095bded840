"""``btrfs``: subvolume snapshots with btrfs-progs.

``btrfs.snapshot`` makes a read-only (default) or writable snapshot of a
subvolume. It is made under a private name, its own UUID is journaled
(``ctx.remember``), and only then is it renamed to ``dest`` without replacing:
cancel deletes only the subvolume with that UUID, at ``dest`` or the private
name, never one found there by its parent UUID. ``btrfs.delete`` deletes a subvolume after the commit
point (finalize).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, RunContext, hookimpl
from blktx_plugins._fs import rename_noreplace


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
        Param("dest", "path", required=True, doc="where the snapshot appears; must not exist", creates=True),
        Param("readonly", "bool", default=True, doc="make a read-only snapshot"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["dest"])

    def check(self, action: Action, ctx: RunContext) -> None:
        source, dest = action.params["source"], action.params["dest"]
        info = subvolume_info(source)
        if info is None:
            raise Refused(
                f"{source} is not a btrfs subvolume",
                hint="create it with `btrfs subvolume create`; a plain directory cannot be snapshotted",
            )
        if os.path.lexists(dest):
            raise Refused(f"{dest} already exists", hint="choose a new destination")
        if not os.path.isdir(os.path.dirname(dest)):
            raise Refused(f"{os.path.dirname(dest)} does not exist")
        action.undo["source_uuid"] = info.get("UUID", "")
        # A private name in dest's folder, recorded before it is created (the do intent).
        folder, base = os.path.split(dest)
        action.undo["tmp"] = os.path.join(folder, f".{base}.blktx-{ctx.txid}-{secrets.token_hex(4)}")

    def do(self, action: Action, ctx: RunContext) -> None:
        dest, tmp = action.params["dest"], action.undo["tmp"]
        if os.path.lexists(tmp):
            raise ActionFailed(f"{tmp} exists; it was left alone")
        btrfs("subvolume", "snapshot", *(["-r"] if action.params["readonly"] else []), action.params["source"], tmp)
        info = subvolume_info(tmp)
        if info is None or not info.get("UUID"):
            raise ActionFailed(f"btrfs made no subvolume at {tmp}")
        # The snapshot's own UUID is durable before it appears under dest: cancel
        # deletes a subvolume only if it has that UUID.
        action.undo["uuid"] = info["UUID"]
        ctx.remember([action])
        try:
            rename_noreplace(tmp, dest)  # rename(2) would replace an empty folder made meanwhile
        except FileExistsError:
            raise ActionFailed(f"{dest} appeared after the check; it was left alone") from None

    def _ours(self, action: Action) -> list[str]:
        """Where the snapshot this action made is: dest or the private name, only if
        the subvolume there has the UUID do recorded."""
        uuid = action.undo.get("uuid")
        if not uuid:
            return []
        found = []
        for path in (action.params["dest"], action.undo.get("tmp", "")):
            info = subvolume_info(path) if path else None
            if info is not None and info.get("UUID") == uuid:
                found.append(path)
        return found

    def cancel(self, action: Action, ctx: RunContext) -> None:
        for path in self._ours(action):
            btrfs("subvolume", "delete", path)

    def member_exists(self, action: Action) -> bool | None:
        """The snapshot is still at its dest, as the very subvolume this run made."""
        info = subvolume_info(action.params["dest"])
        return info is not None and bool(action.undo.get("uuid")) and info.get("UUID") == action.undo["uuid"]

    def leftovers(self, action: Action) -> list[Leftover]:
        found = [Leftover(action.target, f"btrfs snapshot {p} (UUID {action.undo['uuid']})") for p in self._ours(action)]
        tmp = action.undo.get("tmp", "")
        if not action.undo.get("uuid") and tmp and subvolume_info(tmp) is not None:
            found.append(
                Leftover(
                    action.target,
                    f"maybe blktx's: subvolume {tmp} (blktx died before recording its UUID); if so: btrfs subvolume delete {tmp}",
                )
            )
        return found


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
