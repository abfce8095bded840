"""Whom a QEMU tool that opens files *by name* runs as: the least privileged identity.

Some QEMU tools cannot be given verified descriptors for everything they open:
``qemu-img rebase`` re-reads the chain's headers and opens each backing file by the
name its header gives. Whoever can rewrite one of those headers (or rename an entry in
one of their folders) between blktx's check and the tool's start chooses what it
opens. Run as root, that could be any file on the host (``/etc/shadow``), merged into
an image that user can read. So the tool runs as the one user and group that can
change those files already: it can then read only what they could read themselves.

- :func:`writers` — who can change a path: the owners and writable groups of the file
  and of every folder above it (a folder's writer can swap the names below it), and
  whether anyone can (world-writable, not sticky).
- :func:`least_privileged` — root when only root can change any of the paths;
  ``nobody:nogroup`` when anyone can; else that one user (or ``nobody``) with that
  one group (or the user's own, or ``nogroup``) and no other groups; refused when
  several users or groups can.
- :func:`RunAs.refusal` — what that identity could not read, write or reach, found at
  check from the permission bits (ACLs are not read: a tool they stop fails with
  the OS's message).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from blktx import Refused

NOBODY = 65534
NOGROUP = 65534


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
    for path in paths:
        here = os.path.abspath(path)
        while here not in seen:
            seen.add(here)
            st = os.lstat(here)
            folder = stat.S_ISDIR(st.st_mode)
            sticky = folder and bool(st.st_mode & stat.S_ISVTX)
            if st.st_uid != 0:
                users.setdefault(st.st_uid, f"{here} is owned by uid {st.st_uid}")
            if st.st_mode & stat.S_IWGRP and not sticky:
                groups.setdefault(st.st_gid, f"{here} is writable by gid {st.st_gid}")
            if st.st_mode & stat.S_IWOTH and not sticky and not stat.S_ISLNK(st.st_mode):
                anyone = anyone or f"{here} is writable by anyone"
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
    return Writers(users, groups, anyone)


@dataclass(frozen=True)
class RunAs:
    """A user and group to run a tool as, with no supplementary groups."""

    uid: int
    gid: int
    why: str

    def __str__(self) -> str:
        return f"uid {self.uid}, gid {self.gid} ({self.why})"

    def allows(self, path: str, bits: int) -> bool:
        """Whether this identity has ``bits`` (``os.R_OK``, ``W_OK``, ``X_OK``) on ``path``
        by its permission bits."""
        st = os.stat(path)
        mode = st.st_mode
        if st.st_uid == self.uid:
            have = (mode >> 6) & 7
        elif st.st_gid == self.gid:
            have = (mode >> 3) & 7
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
    if found.anyone is not None:  # anyone may be the one who changed them: only what anyone can read
        return RunAs(NOBODY, NOGROUP, found.anyone)
    if not found.users and not found.groups:
        return None
    if len(found.users) > 1 or len(found.groups) > 1:
        whys = [*found.users.values(), *found.groups.values()]
        raise Refused(
            "the images are changeable by more than one user or group (" + "; ".join(whys) + "): "
            "no one identity can open them all without reading what another could not",
            hint="give the chain's images and folders one owner",
        )
    uid = next(iter(found.users), NOBODY)
    if found.groups:
        gid = next(iter(found.groups))
    elif found.users:
        import pwd

        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = NOGROUP
    else:
        gid = NOGROUP
    return RunAs(uid, gid, next(iter([*found.users.values(), *found.groups.values()])))
