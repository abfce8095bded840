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
        return ["vm:" + target[3:].rsplit("/", 1)[0]]
    return [target]


def lock_owners(targets: list[str]) -> dict[str, str]:
    """Every lock key of ``targets``, each with the first target that needs it."""
    owners: dict[str, str] = {}
    for target in targets:
        for key in lock_keys(target):
            owners.setdefault(key, target)
    return owners
