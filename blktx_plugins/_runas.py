"""Whom a QEMU tool that opens files *by name* runs as: the least privileged identity.

Some QEMU tools cannot be given verified descriptors for everything they open:
``qemu-img rebase`` re-reads the chain's headers and opens each backing file by the
name its header gives. Whoever can rewrite one of those headers (or rename an entry in
one of their folders) between blktx's check and the tool's start chooses what it
opens. Run as root, that could be any file on the host (``/etc/shadow``), merged into
an image that user can read. So the tool runs as the one user and group that can
change those files already: it can then read only what they could read themselves.

- :func:`writers` — who can change a path: the owners and writable groups of the file
  and of every folder above it and above each symlink its lookup follows (a
  folder's writer can swap the names below it), the
  users and groups a POSIX ACL lets write them, and whether anyone can
  (world-writable, not sticky).
- :func:`least_privileged` — root when only root can change any of the paths;
  else the one user who can, with their own group (the primary one of the user
  database, ``nogroup`` for a uid it does not know) and no other groups; refused
  when several users can, when anyone or a group without such a user can (no one
  uid stands for them: ``nobody`` may own files some of them must not read), and
  when a user and a group can that is not the user's alone (its other members
  would make the tool read as that user).
- :func:`RunAs.refusal` — what that identity could not read, write or reach, found at
  check from the permission bits and POSIX ACLs.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from blktx import Refused

NOBODY = 65534
NOGROUP = 65534

# POSIX ACL entries (``system.posix_acl_access``: version 2, then tag u16, perm u16, id u32).
ACL_XATTR = "system.posix_acl_access"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def acl(path: str) -> list[tuple[int, int, int]] | None:
    """The POSIX access ACL of ``path`` (not following a symlink) as (tag, perm, id)
    entries; None when it has none beyond its mode bits. Unreadable or malformed: the
    refusal names the file (a tool run as someone else must not be given the benefit
    of the doubt)."""
    try:
        data = os.getxattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise Refused(f"cannot read the ACL of {path}: {exc.strerror}") from None
    if len(data) < 4 or (len(data) - 4) % 8 or struct.unpack_from("<I", data)[0] != 2:
        raise Refused(f"the ACL of {path} is not one blktx can read")
    return [struct.unpack_from("<HHI", data, at) for at in range(4, len(data), 8)]


def _class_writers(st: os.stat_result, entries: list[tuple[int, int, int]] | None) -> tuple[set[int], set[int]]:
    """The users (other than the owner) and groups whose ACL entries, or the group
    bits, let them write a file or folder of ``st``."""
    if entries is None:
        return set(), ({st.st_gid} if st.st_mode & stat.S_IWGRP else set())
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 7)
    users = {i for tag, perm, i in entries if tag == ACL_USER and perm & mask & 2}
    groups = {i for tag, perm, i in entries if tag == ACL_GROUP and perm & mask & 2}
    groups |= {st.st_gid for tag, perm, _ in entries if tag == ACL_GROUP_OBJ and perm & mask & 2}
    return users, groups


@dataclass(frozen=True)
class Writers:
    """Who besides root can change a set of paths, and through which path each."""

    users: dict[int, str]
    groups: dict[int, str]
    anyone: str | None


def writers(paths: Iterable[str]) -> Writers:
    """The users and groups (other than root) that can change any of ``paths``."""
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    anyone: str | None = None
    seen: set[str] = set()
    for here in (p for path in paths for p in resolution(path)):
        while here not in seen:
            seen.add(here)
            try:
                st = os.lstat(here)
            except FileNotFoundError:  # a name QEMU would look up and not find: its folder's writers may make it
                here = os.path.dirname(here)
                continue
            folder = stat.S_ISDIR(st.st_mode)
            sticky = folder and bool(st.st_mode & stat.S_ISVTX)
            if st.st_uid != 0:
                users.setdefault(st.st_uid, f"{here} is owned by uid {st.st_uid}")
            if not sticky and not stat.S_ISLNK(st.st_mode):
                by_acl, by_group = _class_writers(st, acl(here))
                for uid in sorted(by_acl - {0}):
                    users.setdefault(uid, f"{here} is writable by uid {uid} (its ACL)")
                for gid in sorted(by_group):
                    groups.setdefault(gid, f"{here} is writable by gid {gid}")
            if st.st_mode & stat.S_IWOTH and not sticky and not stat.S_ISLNK(st.st_mode):
                anyone = anyone or f"{here} is writable by anyone"
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
    return Writers(users, groups, anyone)


def resolution(path: str) -> list[str]:
    """Where each symlink a lookup of ``path`` follows lies (its folder's real path
    joined with its name), each folder it passes through (``sub`` of ``sub/../x``
    too), then the real path ``path`` resolves to: whoever can change any of them can
    change what a tool opening ``path`` by name opens. A folder on the way that does
    not exist is refused (the kernel stops there; whoever makes it later steers the rest)."""
    found: list[str] = []
    passed: set[str] = set()
    # not abspath(): it would fold "gone/.." away before the walk, as the kernel does not
    parts = (path if path.startswith("/") else os.path.join(os.getcwd(), path)).split("/")[::-1]
    current, hops = "/", 0
    while parts:
        name = parts.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        step = os.path.join(current, name)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            if parts:  # the kernel stops here; whoever creates it later decides where the rest leads
                raise Refused(f"{path}: its folder {step} does not exist") from None
            current = step
            continue
        if not stat.S_ISLNK(st.st_mode):
            if parts:  # a folder passed through (then perhaps left by ".."): its writers count too
                passed.add(step)
                found.append(step)
            current = step
            continue
        hops += 1
        if hops > 40:
            raise Refused(f"{path}: too many levels of symbolic links")
        found.append(step)
        target = os.readlink(step)
        if target.startswith("/"):
            current = "/"
        parts.extend(target.split("/")[::-1])
    found.append(current)
    # the folders above the end are walked by writers() anyway: keep those it would not reach
    return [p for p in found if p not in passed or not (current + "/").startswith(p + "/")]


@dataclass(frozen=True)
class RunAs:
    """A user and group to run a tool as, with the user's own supplementary groups
    (``groups``, from the group database: what the user can read anyway)."""

    uid: int
    gid: int
    why: str
    groups: tuple[int, ...] = ()

    def _in(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups

    def __str__(self) -> str:
        return f"uid {self.uid}, gid {self.gid} ({self.why})"

    def allows(self, path: str, bits: int) -> bool:
        """Whether this identity has ``bits`` (``os.R_OK``, ``W_OK``, ``X_OK``) on ``path``
        by its permission bits and POSIX ACL (as the kernel decides it)."""
        st = os.stat(path)
        mode = st.st_mode
        entries = acl(os.path.realpath(path))
        if st.st_uid == self.uid:
            have = (mode >> 6) & 7
        elif entries is None:
            have = (mode >> 3) & 7 if self._in(st.st_gid) else mode & 7
        else:
            mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 7)
            named = [perm for tag, perm, i in entries if tag == ACL_USER and i == self.uid]
            groups = [
                perm
                for tag, perm, i in entries
                if (tag == ACL_GROUP_OBJ and self._in(st.st_gid)) or (tag == ACL_GROUP and self._in(i))
            ]
            if named:
                have = named[0] & mask
            elif groups:
                have = next((p & mask for p in groups if p & mask & bits == bits), 0)
            else:
                have = mode & 7
        return have & bits == bits

    def refusal(self, reads: Iterable[str], writes: Iterable[str]) -> str | None:
        """What this identity could not do: read ``reads``, read and write ``writes``,
        and reach each through its folders. None when it can do all of it."""
        wanted = [(p, os.R_OK) for p in reads] + [(p, os.R_OK | os.W_OK) for p in writes]
        for path, bits in wanted:
            folder = os.path.dirname(os.path.abspath(path))
            while True:
                if not self.allows(folder, os.X_OK):
                    return f"{self} cannot reach {path}: no search permission on {folder}"
                parent = os.path.dirname(folder)
                if parent == folder:
                    break
                folder = parent
            if not self.allows(path, bits):
                what = "read and write" if bits & os.W_OK else "read"
                return f"{self} cannot {what} {path}"
        return None


def least_privileged(paths: Iterable[str]) -> RunAs | None:
    """Whom a tool opening ``paths`` by name runs as: None (root) when only root can
    change any of them; raises :class:`Refused` when more than one user or group can."""
    found = writers(paths)
    if found.anyone is not None or (found.groups and not found.users):
        # Anyone, or a group's members: no one user stands for them all, and any uid
        # blktx chose (``nobody`` too) may own files some of them must not read.
        why = found.anyone or next(iter(found.groups.values()))
        raise Refused(
            f"{why}: whoever changed the chain could choose what the merge reads, and no one user "
            "stands for them all to run it as",
            hint="give the chain's images one owning user, writable by no group and no one else, in folders only root writes",
        )
    if not found.users:
        return None
    if len(found.users) > 1 or len(found.groups) > 1:
        whys = [*found.users.values(), *found.groups.values()]
        raise Refused(
            "the images are changeable by more than one user or group (" + "; ".join(whys) + "): "
            "no one identity can open them all without reading what another could not",
            hint="give the chain's images and folders one owner",
        )
    uid = next(iter(found.users))
    if found.users and found.groups and not _own_group(uid, next(iter(found.groups))):
        # The group's other members can change the chain too: run as the user, the tool
        # would read for them what only the user may (and as the group, what only they may).
        whys = [*found.users.values(), *found.groups.values()]
        raise Refused(
            "the images are changeable by more than one user or group (" + "; ".join(whys) + ", "
            "a group that is not that user's alone): no one identity can open them all without "
            "reading what another could not",
            hint="give the chain's images one owner, and make them and their folders writable by no group",
        )
    why = next(iter([*found.users.values(), *found.groups.values()]))
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:  # a uid the user database does not know (a container's): no groups of its own
        return RunAs(uid, next(iter(found.groups), NOGROUP), why)
    # The user's own groups, as a login gives them: what the user can read anyway.
    groups = tuple(sorted(set(os.getgrouplist(user.pw_name, user.pw_gid)) - {user.pw_gid}))
    return RunAs(uid, user.pw_gid, why, groups)


def _own_group(uid: int, gid: int) -> bool:
    """Whether ``gid`` is ``uid``'s primary group and no other user (root aside) is in
    it, as the user and group databases say; False when either is unknown."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    if user.pw_gid != gid or set(group.gr_mem) - {user.pw_name, "root"}:
        return False
    return all(p.pw_uid in (uid, 0) for p in pwd.getpwall() if p.pw_gid == gid)
