"""``file.snapshot``: snapshot a plain file by reflink, or by copy where the
filesystem cannot share blocks."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, Register, RunContext, hookimpl

FICLONE = 0x40049409  # ioctl: make dest share src's blocks (btrfs, XFS)


def clone_or_copy(src: str, fd: int) -> str:
    """Fill the open file ``fd`` with ``src``'s content; return how."""
    with open(src, "rb") as fin:
        try:
            fcntl.ioctl(fd, FICLONE, fin.fileno())
            how = "reflink"
        except OSError:
            with os.fdopen(os.dup(fd), "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            how = "copy"
    os.fchmod(fd, stat.S_IMODE(os.stat(src).st_mode))
    os.fsync(fd)
    return how


def _ours(path: str, ident: list[int] | None) -> bool:
    """Whether ``path`` is the very file this action made (its device and inode)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return bool(ident) and stat.S_ISREG(st.st_mode) and [st.st_dev, st.st_ino] == ident


class FileSnapshot(ActionType):
    """Snapshot a plain file by reflink (or copy) next to it."""

    name = "file.snapshot"
    params = (
        Param("path", "path", required=True, doc="the file to snapshot"),
        Param("dest", "path", default="", doc="the snapshot file (default: <path>.snap); must not exist", creates=True),
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
        # used only where the filesystem has no unnamed files; recorded before it exists
        action.undo["tmp"] = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.blktx-{ctx.txid}")

    def do(self, action: Action, ctx: RunContext) -> None:
        # Own by identity: make the copy with no name (O_TMPFILE; a private name
        # where the filesystem cannot), journal its inode, and only then link it
        # at dest. link(2) never replaces a file that appeared there meanwhile, and
        # cancel removes a file only if it is that inode, never because of its name.
        dest = action.undo["dest"]
        try:
            fd = os.open(os.path.dirname(dest) or ".", os.O_TMPFILE | os.O_RDWR, 0o600)
            tmp = None
        except OSError:
            tmp = action.undo["tmp"]
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            st = os.fstat(fd)
            action.undo["made"] = [st.st_dev, st.st_ino]
            ctx.remember([action])
            action.undo["how"] = clone_or_copy(action.params["path"], fd)
            try:
                if tmp is None:  # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link
                    dfd = os.open(os.path.dirname(dest) or ".", os.O_RDONLY)
                    try:
                        os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=dfd, follow_symlinks=True)
                    finally:
                        os.close(dfd)
                else:
                    os.link(tmp, dest)
                    os.unlink(tmp)
            except FileExistsError:
                raise ActionFailed(f"{dest} appeared after the check; it was left alone") from None
        finally:
            os.close(fd)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        for path in (action.undo.get("dest", ""), action.undo.get("tmp", "")):
            if _ours(path, action.undo.get("made")):
                os.unlink(path)

    def member_exists(self, action: Action) -> bool | None:
        """For ``blktx list --verify``: the snapshot is still at dest, as the very file this action made."""
        return _ours(action.undo.get("dest", ""), action.undo.get("made"))

    def leftovers(self, action: Action) -> list[Leftover]:
        return [
            Leftover(action.target, f"snapshot file {p}")
            for p in (action.undo.get("dest", ""), action.undo.get("tmp", ""))
            if _ours(p, action.undo.get("made"))
        ]


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(FileSnapshot)
