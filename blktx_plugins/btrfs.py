"""``btrfs``: subvolume snapshots with btrfs-progs.

``btrfs.snapshot`` makes a read-only (default) or writable snapshot of a
subvolume. It is made under a private name, its own UUID is journaled
(``ctx.remember``), and only then is it renamed to ``dest`` without replacing:
cancel deletes only the subvolume with that UUID, at ``dest`` or the private
name, never one found there by its parent UUID. ``btrfs.delete`` deletes a subvolume after the commit
point (finalize), only the one with the UUID it was given. ``btrfs.revert`` brings a
subvolume back to a snapshot: a writable snapshot of it is made under a private
name, the current subvolume is renamed aside and the copy renamed into its place;
cancel renames back (every subvolume found by its UUID), and after the commit point
the subvolume set aside is deleted unless ``keep_current``.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import subprocess
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, Register, RunContext, hookimpl
from blktx_plugins._fs import fsync_dir, rename_noreplace


def btrfs(*args: str) -> str:
    exe = shutil.which("btrfs")
    if exe is None:
        raise ActionFailed("btrfs is not installed (Debian package btrfs-progs)")
    out = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ActionFailed(f"btrfs {' '.join(args[:2])}: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def _listed(near: str, uuid: str) -> str:
    """Where on the filesystem of ``near``'s folder the subvolume ``uuid`` is now, or ""."""
    folder = os.path.dirname(near) or "."
    try:
        out = btrfs("subvolume", "list", "-u", folder)
    except ActionFailed:
        return ""
    for line in out.splitlines():
        if f" uuid {uuid.lower()} " in line + " " and " path " in line:
            return line.split(" path ", 1)[1]
    return ""


def subvolume_info(path: str) -> dict[str, str] | None:
    """``btrfs subvolume show`` as a dict, or None when ``path`` is not a subvolume."""
    if not os.path.isdir(path) or os.stat(path).st_ino != 256:  # every subvolume root is inode 256
        return None
    try:
        out = btrfs("subvolume", "show", path)
    except ActionFailed:
        return None
    lines = out.splitlines()
    info = {"Path": lines[0].strip()} if lines else {}  # from the filesystem's top level
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def uuid_at(path: str) -> str | None:
    """The UUID of the subvolume at ``path`` itself (a symlink there is not it), or None."""
    if not path or os.path.islink(path):
        return None
    info = subvolume_info(path)
    return (info.get("UUID") or None) if info is not None else None


_LIST = re.compile(r"^ID (\d+) gen \d+ top level (\d+) path (.*)$")


def nested_subvolumes(path: str, info: dict[str, str]) -> list[str]:
    """The subvolumes directly inside the subvolume at ``path`` (``info`` is its
    ``subvolume show``), each under ``path``."""
    own, rel = info.get("Subvolume ID", ""), info.get("Path", "").strip("/")
    found = []
    for line in btrfs("subvolume", "list", path).splitlines():
        m = _LIST.match(line.strip())
        if m and m.group(2) == own and m.group(1) != own:
            # btrfs-progs name them from path itself, or (older) from the top level
            name = m.group(3).removeprefix("<FS_TREE>/")
            under = os.path.join(path, name)
            if not os.path.isdir(under) and rel and name.startswith(rel + "/"):
                under = os.path.join(path, name[len(rel) + 1 :])
            found.append(under)
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str, str]]:
    """``/proc/self/mountinfo``: (device, mount point, filesystem type, super options) of each mount."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            found.append((fields[2], _unescape(fields[4]), fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""))
    return found


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _mount_of(real: str, mounts: list[tuple[str, str, str, str]]) -> tuple[str, str, str, str] | None:
    """The mount ``real`` (a resolved path) lies on."""
    best = None
    for m in mounts:
        if _under(real, m[1]) and (best is None or len(m[1]) >= len(best[1])):
            best = m
    return best


def mount_problem(path: str, info: dict[str, str]) -> str | None:
    """Why renaming the subvolume at ``path`` would not switch what its users see: it
    is a mount point, something is mounted inside it, or it (or a folder of it) is
    mounted elsewhere too (``subvolid=`` of a mount of the same filesystem)."""
    real = os.path.realpath(path)
    mounts = _mounts()
    inside = [m[1] for m in mounts if _under(m[1], real)]
    if inside:
        return f"{path} is a mount point" if real in inside else f"something is mounted inside {path}: {', '.join(inside[:5])}"
    ours = _mount_of(real, mounts)
    own = f"subvolid={info.get('Subvolume ID', '')}"
    if ours is not None:
        elsewhere = [m[1] for m in mounts if m[0] == ours[0] and m[2] == "btrfs" and own in m[3].split(",")]
        if elsewhere:
            return f"the subvolume at {path} is also mounted at {', '.join(elsewhere[:5])}"
    return None


def same_filesystem(a: str, b: str) -> bool:
    """Whether two paths lie on mounts of one filesystem (one device in mountinfo)."""
    mounts = _mounts()
    ma, mb = _mount_of(os.path.realpath(a), mounts), _mount_of(os.path.realpath(b), mounts)
    return ma is not None and mb is not None and ma[0] == mb[0]


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or "?"
    except OSError:
        return "?"


def _use(pid: str, real: str) -> str | None:
    """How process ``pid`` uses something under ``real``: its working directory, root,
    executable, an open file or a mapped file; None when it does not."""
    base = f"/proc/{pid}"
    links = [("cwd", "working directory"), ("root", "root directory"), ("exe", "executable")]
    try:
        links += [(f"fd/{fd}", "open file") for fd in os.listdir(f"{base}/fd")]
    except OSError:
        pass
    for link, what in links:
        try:
            target = os.readlink(f"{base}/{link}").removesuffix(" (deleted)")
        except OSError:
            continue
        if _under(target, real):
            return f"{what} {target}"
    try:
        with open(f"{base}/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and _under(parts[5].strip().removesuffix(" (deleted)"), real):
                    return f"mapped file {parts[5].strip()}"
    except OSError:
        pass
    return None


def holders(path: str) -> list[str]:
    """Every other process that has its working directory, root, executable, an open
    or a mapped file under ``path`` (as this process's mount namespace names it):
    ``name (pid N: what)``."""
    real = os.path.realpath(path)
    me = str(os.getpid())
    found = []
    for pid in sorted(filter(str.isdigit, os.listdir("/proc")), key=int):
        if pid == me:
            continue
        use = _use(pid, real)
        if use:
            found.append(f"{_comm(pid)} (pid {pid}: {use})")
    return found


# ioctls (linux/btrfs.h): the subvolume an open descriptor is in, and deleting one by id
_IOC_GET_SUBVOL_INFO = (2 << 30) | (504 << 16) | (0x94 << 8) | 60  # _IOR(0x94, 60, 504-byte args)
_IOC_SNAP_DESTROY_V2 = (1 << 30) | (4096 << 16) | (0x94 << 8) | 63  # _IOW(0x94, 63, btrfs_ioctl_vol_args_v2)
_SUBVOL_SPEC_BY_ID = 1 << 4
_SUBVOL_ROOT_INODE = 256


def delete_subvolume(path: str, uuid: str) -> bool:
    """Delete the subvolume at ``path`` only if it is the one with ``uuid``: opened
    without following a last symlink, its UUID read from that descriptor, and deleted
    by its id on that very filesystem, so that nothing swapped in at the name after the
    check (a symlink, a rename) is ever what goes. False when ``path`` is not it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone, a symlink, not a folder: not it
    try:
        if os.fstat(fd).st_ino != _SUBVOL_ROOT_INODE:
            return False
        info = bytearray(504)
        fcntl.ioctl(fd, _IOC_GET_SUBVOL_INFO, info)
        import uuid as uuidlib  # here, not at start-up

        if str(uuidlib.UUID(bytes=bytes(info[296:312]))) != uuid.lower():
            return False
        treeid = struct.unpack_from("<Q", info, 0)[0]
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        args = bytearray(4096)
        struct.pack_into("<QQQ", args, 0, 0, 0, _SUBVOL_SPEC_BY_ID)
        struct.pack_into("<Q", args, 56, treeid)
        fcntl.ioctl(parent, _IOC_SNAP_DESTROY_V2, args)
    except OSError as exc:
        raise ActionFailed(f"deleting subvolume {path} (UUID {uuid}): {exc.strerror}") from None
    finally:
        os.close(parent)
    return True


class Snapshot(ActionType):
    """Snapshot a btrfs subvolume (read-only unless readonly = false)."""

    name = "btrfs.snapshot"
    revert_type = "btrfs.revert"
    delete_type = "btrfs.delete"
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
            raise Refused(f"{os.path.dirname(dest)} does not exist", missing=os.path.dirname(dest))
        action.undo["source_uuid"] = info.get("UUID", "")
        # A private name in dest's folder, recorded before it is created (the do intent).
        folder, base = os.path.split(dest)
        action.undo["tmp"] = os.path.join(folder, f".{base}.blktx-{ctx.txid}-{os.urandom(4).hex()}")

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
            delete_subvolume(path, action.undo["uuid"])

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

    def _uuid(self, action: Action) -> str:
        uuid = action.undo.get("uuid")
        if not uuid:
            raise ValueError(f"the journal holds no UUID of the snapshot {action.params['dest']}")
        return str(uuid)

    def revert_params(self, action: Action) -> dict[str, Any]:
        """Bring ``source`` back to the snapshot at ``dest``, the very subvolume this run made."""
        params = {"path": action.params["source"], "snapshot": action.params["dest"], "uuid": self._uuid(action)}
        if action.undo.get("source_uuid"):
            params["source_uuid"] = action.undo["source_uuid"]
        return params

    def delete_params(self, action: Action) -> dict[str, Any]:
        """Delete the snapshot at ``dest``, only as the subvolume this run made."""
        return {"path": action.params["dest"], "uuid": self._uuid(action)}


class Delete(ActionType):
    """Delete a btrfs subvolume (finalize: runs after the commit point)."""

    name = "btrfs.delete"
    finalize = True
    params = (
        Param("path", "path", required=True, doc="the subvolume to delete"),
        Param("uuid", "str", default="", doc="its UUID: a subvolume at path with another UUID is refused"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["path"])

    def check(self, action: Action, ctx: RunContext) -> None:
        path, uuid = action.params["path"], action.params["uuid"]
        info = subvolume_info(path)
        if info is None:
            raise Refused(f"{path} is not a btrfs subvolume")
        if uuid and info.get("UUID") != uuid:
            raise Refused(
                f"{path} is subvolume {info.get('UUID') or '(no UUID)'}, not {uuid}: "
                "a subvolume made again under that name is never deleted",
                hint="`btrfs subvolume show` tells them apart; delete it by hand if it must go",
            )
        nested = nested_subvolumes(path, info)
        if nested:
            raise Refused(
                f"{path} holds other subvolumes ({', '.join(nested[:5])}): btrfs cannot delete it",
                hint="move or delete the nested subvolumes first",
            )
        action.undo["uuid"] = info.get("UUID", "")

    def do(self, action: Action, ctx: RunContext) -> None:
        if not delete_subvolume(action.params["path"], action.undo["uuid"]):
            # Not at its name: deleted already (a retry, recover rolling forward), or moved
            # away, which is refused rather than reported done.
            moved = _listed(action.params["path"], action.undo["uuid"])
            if moved:
                raise ActionFailed(f"subvolume UUID {action.undo['uuid']} was moved to {moved}; left alone")


class Revert(ActionType):
    """Bring a btrfs subvolume back to a snapshot (the current one set aside, deleted after the commit)."""

    name = "btrfs.revert"
    # do only copies a read-only snapshot; the switch is in invalidate
    do_before_quiesce = True
    params = (
        Param("path", "path", required=True, doc="the live subvolume to bring back"),
        Param("snapshot", "path", required=True, doc="the snapshot to bring it back to (left as it is)"),
        Param("uuid", "str", default="", doc="the snapshot's UUID: a subvolume at snapshot with another UUID is refused"),
        Param("source_uuid", "str", default="", doc="the UUID of what was snapshotted: the snapshot's parent must be it"),
        Param(
            "keep_current",
            "bool",
            default=False,
            doc="keep what path held (at .<name>.blktx-before-<txid>, named in the output), do not delete it",
        ),
    )

    def target(self, action: Action) -> str:
        return str(action.params["path"])

    def catalog_member(self, action: Action) -> dict[str, Any] | None:
        """With keep_current, what ``path`` held, set aside: as the btrfs.snapshot member
        that could have made it, so that it can be reverted to or deleted by its UUID."""
        if not action.params["keep_current"] or not action.undo.get("live_uuid"):
            return None
        return {
            "index": action.index,
            "type": Snapshot.name,
            "target": action.undo["aside"],
            "params": {"source": action.params["path"], "dest": action.undo["aside"], "readonly": False},
            "identity": {"uuid": action.undo["live_uuid"]},
        }

    def check(self, action: Action, ctx: RunContext) -> None:
        path, snap, uuid = action.params["path"], action.params["snapshot"], action.params["uuid"]
        for name in (path, snap):
            # a folder on the way re-pointed (a symlink swapped in for a folder) would
            # make the rename swap somebody else's subvolume: the real path or nothing
            if os.path.realpath(name) != os.path.normpath(name):
                raise Refused(
                    f"{name} goes through a symlink (it resolves to {os.path.realpath(name)})",
                    hint="name the subvolume by its real path",
                )
        live = subvolume_info(path)
        if live is None:
            raise Refused(f"{path} is not a btrfs subvolume")
        info = None if os.path.islink(snap) else subvolume_info(snap)
        if info is None or not info.get("UUID"):
            raise Refused(f"the snapshot {snap} is not a btrfs subvolume (any more)")
        if uuid and info["UUID"] != uuid:
            raise Refused(
                f"{snap} is subvolume {info['UUID']}, not the snapshot {uuid}: "
                "a subvolume made again under that name is never used",
                hint="`btrfs subvolume show` tells them apart",
            )
        source_uuid = action.params["source_uuid"]
        if source_uuid and info.get("Parent UUID") != source_uuid:
            raise Refused(f"{snap} is not a snapshot of subvolume {source_uuid} (its parent: {info.get('Parent UUID')})")
        if live.get("UUID") == info["UUID"]:
            raise Refused(f"{path} is the snapshot itself")
        if _under(os.path.realpath(snap), os.path.realpath(path)):
            raise Refused(f"the snapshot {snap} lies inside {path}: the revert would move it aside with it")
        if not same_filesystem(path, snap):
            raise Refused(f"{path} and {snap} are not on one btrfs filesystem")
        why = mount_problem(path, live)
        if why:
            raise Refused(
                f"{why}: renaming it would not change what the mount shows",
                hint=f"unmount it, revert through a mount of its parent, mount it again ({path} must be a plain folder entry)",
            )
        in_use = self._in_use(path)
        if in_use:
            raise Refused(
                in_use, hint="stop what uses it first: a process with files open in it would go on using the old subvolume"
            )
        nested = nested_subvolumes(path, live)
        if nested and not action.params["keep_current"]:
            raise Refused(
                f"{path} holds other subvolumes ({', '.join(nested[:5])}): they are not in the snapshot, and the "
                "subvolume set aside could not be deleted",
                hint="move them out of it first (mv works for subvolumes), or pass --keep-current: they stay in the "
                "subvolume kept aside",
            )
        folder, base = os.path.split(path)
        action.undo["aside"] = os.path.join(folder, f".{base}.blktx-before-{ctx.txid}")
        action.undo["new"] = os.path.join(folder, f".{base}.blktx-revert-{ctx.txid}")
        for private in (action.undo["aside"], action.undo["new"]):
            if len(os.fsencode(os.path.basename(private))) > 255:
                raise Refused(f"the name {base!r} is too long for blktx's private names next to it")
            if os.path.lexists(private):
                raise Refused(f"{private} exists", hint="it is not blktx's to remove: look at it, remove it by hand")
        # Identities, journaled with BEGIN: the live subvolume (cancel puts it back,
        # finish deletes it) and the snapshot copied.
        action.undo["live_uuid"] = live.get("UUID", "")
        action.undo["snap_uuid"] = info["UUID"]
        if nested:
            action.undo["nested"] = nested

    @staticmethod
    def _in_use(path: str) -> str | None:
        users = holders(path)
        more = f" and {len(users) - 5} more" if len(users) > 5 else ""
        return f"{path} is in use by {'; '.join(users[:5])}{more}" if users else None

    def do(self, action: Action, ctx: RunContext) -> None:
        path, snap, new = action.params["path"], action.params["snapshot"], action.undo["new"]
        if uuid_at(snap) != action.undo["snap_uuid"]:
            raise ActionFailed(f"the snapshot {snap} changed after the check")
        if uuid_at(path) != action.undo["live_uuid"]:
            raise ActionFailed(f"{path} changed after the check")
        if os.path.lexists(new):
            raise ActionFailed(f"{new} exists; it was left alone")
        btrfs("subvolume", "snapshot", snap, new)  # writable
        info = subvolume_info(new) if not os.path.islink(new) else None
        if info is None or not info.get("UUID") or info.get("Parent UUID") != action.undo["snap_uuid"]:
            raise ActionFailed(f"btrfs made no snapshot of {snap} at {new}")
        # The copy's own UUID is durable before it is anywhere but its private name:
        # cancel deletes a subvolume only if it has that UUID.
        action.undo["new_uuid"] = info["UUID"]
        ctx.remember([action])

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        path, aside, new = action.params["path"], action.undo["aside"], action.undo["new"]
        in_use = self._in_use(path)
        if in_use:
            raise ActionFailed(in_use)
        if uuid_at(path) != action.undo["live_uuid"]:
            raise ActionFailed(f"{path} changed after the check")
        # Each rename's intent is durable before it: from here on the live subvolume may be aside.
        action.undo["moved"] = True
        ctx.remember([action])
        try:
            rename_noreplace(path, aside)
        except FileExistsError:
            raise ActionFailed(f"{aside} appeared after the check; it was left alone") from None
        # The second intent marks where a run killed between the renames stopped (cancel
        # itself finds each subvolume by its UUID, wherever it is).
        action.undo["swapped"] = True
        ctx.remember([action])
        try:
            rename_noreplace(new, path)
        except FileExistsError:
            raise ActionFailed(f"{path} was taken while it was set aside; what is there was left alone") from None
        fsync_dir(os.path.dirname(path))

    def cancel(self, action: Action, ctx: RunContext) -> None:
        """Whatever step was reached (or killed in): the copy, found by its UUID at path
        or its private name, is deleted; the live subvolume, found by its UUID aside, is
        renamed back to path."""
        path, undo = action.params["path"], action.undo
        new_uuid, live_uuid = undo.get("new_uuid"), undo.get("live_uuid")
        if new_uuid:
            for where in (path, undo["new"]):
                if uuid_at(where) == new_uuid:
                    delete_subvolume(where, new_uuid)
        if undo.get("moved") and live_uuid and uuid_at(undo["aside"]) == live_uuid:
            try:
                rename_noreplace(undo["aside"], path)
            except FileExistsError:
                raise ActionFailed(
                    f"{path} is taken by something blktx did not make; the subvolume that was there is {undo['aside']}"
                ) from None
            fsync_dir(os.path.dirname(path))

    def finish(self, action: Action, ctx: RunContext) -> None:
        """After the commit point: the subvolume set aside (by its UUID) is deleted, or
        kept and named."""
        aside, live_uuid = action.undo["aside"], action.undo.get("live_uuid")
        if action.params["keep_current"]:
            nested = action.undo.get("nested")
            action.output = (
                f"what {action.params['path']} held before the revert is kept: subvolume {aside} (UUID {live_uuid})"
                + (f", with the nested subvolumes {', '.join(nested)}" if nested else "")
            )
            return
        if live_uuid and uuid_at(aside) == live_uuid:
            delete_subvolume(aside, live_uuid)

    def leftovers(self, action: Action) -> list[Leftover]:
        path, undo = action.params["path"], action.undo
        new, aside = undo.get("new", ""), undo.get("aside", "")
        new_uuid, live_uuid = undo.get("new_uuid"), undo.get("live_uuid")
        found = []
        if new_uuid and uuid_at(path) == new_uuid:
            found.append(
                Leftover(
                    path,
                    f"{path} is blktx's writable copy (UUID {new_uuid}) of {action.params['snapshot']}, not the "
                    f"subvolume that was there; btrfs subvolume delete {path}",
                )
            )
        if new_uuid and new and uuid_at(new) == new_uuid:
            found.append(Leftover(path, f"blktx's writable copy {new} (UUID {new_uuid}); btrfs subvolume delete {new}"))
        if not new_uuid and new and subvolume_info(new) is not None:
            found.append(
                Leftover(
                    path,
                    f"maybe blktx's: subvolume {new} (blktx died before recording its UUID); if so: btrfs subvolume delete {new}",
                )
            )
        if live_uuid and aside and uuid_at(aside) == live_uuid:
            found.append(
                Leftover(path, f"the subvolume {path} held (UUID {live_uuid}) is at {aside}; put it back: mv {aside} {path}")
            )
        return found


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(Snapshot)
    register(Delete)
    register(Revert)
