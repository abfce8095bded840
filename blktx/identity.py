"""What a target *is*, as opposed to how a spec spells it.

Lock keys come from here: a path is keyed by its real folder and name (so one file
reached through a symlinked folder is one target) and, when it exists, by the
device and inode of what it resolves to (so an image named directly and through a
device symlink is one target). A VM is keyed by its resolved address: every drive
of one VM is one key, since drive names are only learnt at check time.
"""

from __future__ import annotations

import os
import stat


def lock_keys(target: str) -> list[str]:
    """Every key under which ``target`` is locked. Resolving never follows a
    path again later: the keys are only used to keep two runs apart."""
    if target.startswith("/"):
        parent, name = os.path.split(os.path.normpath(target))
        keys = ["path:" + os.path.join(os.path.realpath(parent), name)]
        try:
            st = os.stat(target)
        except (OSError, ValueError):
            return keys
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            keys.append(f"inode:{st.st_dev}:{st.st_ino}")
        return keys
    if target.startswith("vm:"):
        address = target[3:].rsplit("/", 1)[0]
        # one VM reached through a symlinked folder is one VM: key its socket by real path
        return ["vm:" + (os.path.realpath(address) if address.startswith("/") else address)]
    return [target]


def lock_owners(targets: list[str]) -> dict[str, str]:
    """Every lock key of ``targets``, each with the first target that needs it."""
    owners: dict[str, str] = {}
    for target in targets:
        for key in lock_keys(target):
            owners.setdefault(key, target)
    return owners


def untrusted_folders(path: str, seen: dict[tuple[str, bool], str | None] | None = None) -> str | None:
    """Why others than root and the caller could swap or add files at ``path``'s
    folder, or None. As sshd's StrictModes: the folder and each of its ancestors
    must be owned by root or the caller; the folder itself must not be writable
    by group or others, an ancestor only when it has the sticky bit (``/tmp``).
    Both the path as written and the path its symlinks lead to are judged; a
    symlink itself can only be replaced by whoever can write its folder."""
    path = os.path.abspath(path)
    # An existing folder given as such (a command's cwd, a subvolume, a mountpoint):
    # what is in it is its owner's business, and only the writers of the folders
    # above could swap it, so those are judged as ancestors (a sticky /tmp keeps
    # others from renaming it). A file, or a path still to be made: its folder too.
    whole = os.path.isdir(path) and not os.path.islink(path)
    folder = os.path.dirname(path)
    if seen is None:
        return _untrusted_chain(folder, strict=not whole) or _untrusted_chain(os.path.realpath(folder), strict=not whole)
    # ``seen``: the judgement of each folder, kept by the caller for one moment (a
    # spec's paths bound together): 500 images in one folder judge it once.
    key = (folder, whole)
    if key not in seen:
        seen[key] = _untrusted_chain(folder, strict=not whole) or _untrusted_chain(os.path.realpath(folder), strict=not whole)
    return seen[key]


def _untrusted_chain(folder: str, strict: bool = True) -> str | None:
    me = os.geteuid()
    first = strict
    while True:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:  # judged by the nearest folder that exists (whoever can write it can make it)
            st = None
        except OSError as exc:
            return f"{folder}: {exc.strerror}"
        if st is not None and not stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                return f"{folder} is owned by uid {st.st_uid}"
            writable = st.st_mode & 0o022
            if writable and (first or not st.st_mode & stat.S_ISVTX):
                who = "group and others" if writable == 0o022 else "group" if writable & 0o020 else "others"
                return f"{folder} is writable by {who}"
            first = False
        if folder == "/":
            return None
        folder = os.path.dirname(folder)


def untrusted_file(path: str) -> str | None:
    """Why the existing file at ``path`` cannot be trusted (a symlink, another
    owner, writable by others), or None (also when it does not exist)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None
