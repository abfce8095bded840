"""``host.fsfreeze``: freeze host filesystems together for the quiesce window.

For applications that run on the host (a database writing to two volumes) whose
volumes a lower layer snapshots (LVM, a SAN, ZFS through ``exec``): with a quiesce
mode set, every ``host.fsfreeze`` action's mountpoint is frozen (``FIFREEZE``, as
``fsfreeze -f`` does) before the window's steps and thawed (``FITHAW``) right after
the commit point, after a rollback, by the watchdog when the run dies, and by
``blktx recover``. The action itself changes nothing: do, invalidate and cancel
are no-ops; its target is the frozen filesystem, so two runs never freeze one
filesystem at once.

Refused at check: a path that is not a mountpoint, the root filesystem, and the
filesystem that holds the run's journal (the commit is written inside the window:
a frozen journal would wait for itself). A snapshot of a qcow2 image or a btrfs
subvolume *on* a frozen filesystem would wait too: freeze what a lower layer
snapshots.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence

from blktx import Action, ActionType, Hold, Param, Refused, Register, RunContext, hookimpl

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
KIND = "host.fsfreeze"


class FsFreeze(ActionType):
    """Freeze a host filesystem for the quiesce window (thawed in every outcome)."""

    name = "host.fsfreeze"
    params = (Param("path", "path", required=True, doc="the filesystem's mountpoint"),)

    def target(self, action: Action) -> str:
        return "hostfs:" + os.path.realpath(str(action.params["path"]))

    def check(self, action: Action, ctx: RunContext) -> None:
        path = os.path.realpath(action.params["path"])
        if not os.path.ismount(path):
            raise Refused(f"{path} is not a mountpoint", hint="name the folder a filesystem is mounted on")
        if path == "/":
            raise Refused("freezing the root filesystem would freeze blktx itself", hint="freeze a data filesystem")
        journal = getattr(ctx, "journal_path", "")
        if journal and os.stat(os.path.dirname(journal)).st_dev == os.stat(path).st_dev:
            raise Refused(
                f"the run's journal {journal} is on {path}: its commit inside the window would wait for the thaw",
                hint="keep the journal on another filesystem (--journal PATH)",
            )
        if ctx.options.quiesce == "none":
            raise Refused("host.fsfreeze needs a quiesce mode", hint='set [options] quiesce = "fsfreeze" (or "pause")')

    def do(self, action: Action, ctx: RunContext) -> None:
        return None

    def cancel(self, action: Action, ctx: RunContext) -> None:
        return None


def _ioctl(path: str, request: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(FsFreeze)


@hookimpl
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> None:
    """Freeze every host.fsfreeze mountpoint, each announced (journaled) first."""
    mounts = sorted({os.path.realpath(a.params["path"]) for a in actions if a.type.name == FsFreeze.name})
    for path in mounts:
        ctx.holding([Hold(KIND, f"hostfs:{path}", {"path": path})])
        _ioctl(path, FIFREEZE)


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    """Thaw; a filesystem that is not frozen (never was, or already thawed) is fine."""
    if hold.kind != KIND:
        return None
    try:
        _ioctl(hold.data["path"], FITHAW)
    except OSError as exc:
        if exc.errno != 22:  # EINVAL: not frozen
            raise
    return True
