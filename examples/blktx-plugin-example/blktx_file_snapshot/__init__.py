"""``file.snapshot``: snapshot a plain file by reflink, or by copy where the
filesystem cannot share blocks."""

from __future__ import annotations

import fcntl
import os
import shutil
from typing import Any

from blktx import Action, ActionType, Leftover, Param, Refused, RunContext, hookimpl

FICLONE = 0x40049409  # ioctl: make dest share src's blocks (btrfs, XFS)


def clone_or_copy(src: str, dest: str) -> str:
    """Create ``dest`` (never overwriting) with ``src``'s content; return how."""
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with open(src, "rb") as fin:
            try:
                fcntl.ioctl(fd, FICLONE, fin.fileno())
                how = "reflink"
            except OSError:
                with os.fdopen(os.dup(fd), "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                how = "copy"
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.copymode(src, dest)
    return how


class FileSnapshot(ActionType):
    """Snapshot a plain file by reflink (or copy) next to it."""

    name = "file.snapshot"
    params = (
        Param("path", "path", required=True, doc="the file to snapshot"),
        Param("dest", "path", default="", doc="the snapshot file (default: <path>.snap); must not exist"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["path"])

    def check(self, action: Action, ctx: RunContext) -> None:
        path = action.params["path"]
        dest = action.params["dest"] or path + ".snap"
        if not os.path.isfile(path):
            raise Refused(f"{path} is not a regular file")
        if os.path.lexists(dest):
            raise Refused(f"{dest} already exists", hint="choose another dest")
        action.undo["dest"] = dest

    def do(self, action: Action, ctx: RunContext) -> None:
        action.undo["how"] = clone_or_copy(action.params["path"], action.undo["dest"])

    def cancel(self, action: Action, ctx: RunContext) -> None:
        # check proved dest did not exist, and targets are locked: whatever is there now is ours.
        if os.path.lexists(action.undo.get("dest", "")):
            os.unlink(action.undo["dest"])

    def leftovers(self, action: Action) -> list[Leftover]:
        dest = action.undo.get("dest", "")
        return [Leftover(action.target, f"snapshot file {dest}")] if os.path.lexists(dest) else []


@hookimpl
def blktx_register_action_types(register: Any) -> None:
    register(FileSnapshot)
