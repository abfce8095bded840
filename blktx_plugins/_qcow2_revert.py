"""``qcow2.internal-revert``: bring an offline qcow2 image back to one of its internal
snapshots, undoably, so that ``blktx revert GROUP@NAME`` brings a whole group back
all or none.

QMP has no command that applies an internal snapshot to a block node, so each step
is a ``qemu-img snapshot`` on the checked file: given a descriptor of it
(``/proc/self/fd/N``, identity compared, as everywhere in the plugin), its backing
chain not opened (``"backing": null``: a snapshot's clusters are the image's own),
and killed with blktx (``PR_SET_PDEATHSIG``), so that a dead run leaves no
``qemu-img`` working on an image that ``blktx recover`` is about to restore.

Per image (docs/backends.md):

- ``check``: a writable qcow2 file under the roots that no process holds (QEMU's
  image locks; the holder is named), whose snapshot of that id still has the name
  and date the group snapshot recorded.
- ``do``: the ids present are journaled; a safety snapshot of the current state,
  ``blktx-before-revert-<txid>``, is made and its id and date journaled; then the
  group's snapshot is applied (``qemu-img snapshot -a ID``, its identity read
  again just before: ``-a`` looks an id up before a name).
- ``cancel``: if the safety snapshot was journaled, it is applied back (unless
  that is already journaled as done), then deleted by id and date. A safety
  snapshot blktx died before journaling is this run's by its name (nobody else is
  given a name with this transaction's id) and new id; the data was not touched
  yet, so it is only deleted.
- ``finish`` (after the commit point): the safety snapshot is deleted, or with
  ``keep_current`` kept and named in the action's output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, RunContext
from blktx_plugins._image import Snapshot, bare, check_chain, open_verified, read_header, shown
from blktx_plugins._qemu import die_with_parent, holder
from blktx_plugins.qcow2 import _by_hand, _delete_snapshots, _ident, _image

#: The name of the snapshot that keeps an image's state from before the revert.
SAFETY = "blktx-before-revert-{txid}"

_DATE = re.compile(r"([0-9]{1,20})\.([0-9]{9})")


def parse_date(text: str) -> tuple[int, int]:
    """A snapshot's date from ``"SEC.NSEC"``, as :func:`date_text` writes it (and as
    ``qmp.internal-delete`` takes it): QEMU's date-sec, a dot, date-nsec in nine digits."""
    match = _DATE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"date {text!r} is not a snapshot date: give SEC.NSEC, seconds, a dot and nanoseconds in nine digits "
            '(e.g. "1700000000.012345000")'
        )
    return int(match.group(1)), int(match.group(2))


def date_text(date: tuple[int, int]) -> str:
    """``(seconds, nanoseconds)`` as ``"SEC.NSEC"``, nanoseconds in nine digits."""
    return f"{date[0]}.{date[1]:09d}"


def refuse_other_date(action: Action, image: str, found: Snapshot) -> None:
    """Refuse (``qcow2.internal-delete``) a snapshot whose date is not the ``date``
    parameter's, when one is given: its id now names another point in time."""
    if not action.params.get("date"):
        return
    try:
        date = parse_date(action.params["date"])
    except ValueError as exc:
        raise Refused(f"{action.type.name} action #{action.index}: {exc}") from None
    if found.date != date:
        raise Refused(
            f"{image}: snapshot {shown(found.name)} (id {bare(found.id)}) was made at {date_text(found.date)}, "
            f"not {date_text(date)}: another point in time took its id; left alone",
            hint="`blktx list --verify` shows which members of a group snapshot are left",
        )


def _when(date: tuple[int, int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date[0])) + f".{date[1] // 1000:06d}"


def _snapshot_cmd(image: str, ident: Any, *args: str) -> None:
    """``qemu-img snapshot ARGS`` on the file the check read (see the module's docstring)."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ActionFailed("qemu-img is not installed (Debian package qemu-utils)")
    fd = open_verified(image, ident if isinstance(ident, list) else None)
    try:
        node = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
        spec = "json:" + json.dumps(node)
        out = subprocess.run(
            [exe, "snapshot", *args, spec],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            pass_fds=(fd,),
            preexec_fn=die_with_parent(os.getpid()),
        )
    finally:
        os.close(fd)
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().replace(spec, image).replace(f"/proc/self/fd/{fd}", image)
        raise ActionFailed(f"{image}: qemu-img snapshot {' '.join(args)}: {why or f'exit {out.returncode}'}")


class InternalRevert(ActionType):
    """Bring an offline qcow2 image back to an internal snapshot, by identity (cancel restores the state before)."""

    name = "qcow2.internal-revert"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    params = (
        Param("image", "path", required=True, doc="the qcow2 image file"),
        Param("name", "str", required=True, doc="the snapshot's name"),
        Param("id", "str", default="", doc="the snapshot's id (needed when several share the name)"),
        Param("date", "str", default="", doc='when QEMU made it, "SEC.NSEC": a snapshot of that id with another date is refused'),
        Param(
            "keep_current",
            "bool",
            default=False,
            doc="keep the state before the revert as the snapshot blktx-before-revert-<txid> (else deleted after the commit)",
        ),
    )

    def target(self, action: Action) -> str:
        return str(action.params["image"])

    # -- check -------------------------------------------------------------------------

    def check(self, action: Action, ctx: RunContext) -> None:
        image, name, sid = action.params["image"], action.params["name"], action.params["id"]
        real = os.path.realpath(image)
        header = check_chain(real, ctx.options.roots)
        who = holder(real)
        if who:
            raise Refused(
                f"image {image} is in use by {who}: stop the VM first",
                hint="an image is reverted only while no process has it open; nothing was touched",
            )
        if not os.access(real, os.W_OK):
            raise Refused(f"{image} is not writable", hint="check its permissions")
        if header.data_file is not None:
            raise Refused(f"{image} keeps its data in an external data file: QEMU keeps no internal snapshots of such an image")
        try:
            date = parse_date(action.params["date"]) if action.params["date"] else None
        except ValueError as exc:
            raise Refused(f"{self.name} action #{action.index}: {exc}") from None
        snaps = header.snapshots
        found = [s for s in snaps if s.id == sid] if sid else [s for s in snaps if s.name == name]
        which = f"{shown(name)}" + (f" with id {bare(sid)}" if sid else "")
        if not found:
            listed = ", ".join(f"{bare(s.id)}:{shown(s.name)}" for s in snaps) or "none"
            raise Refused(
                f"{image} has no snapshot {which} (it has: {listed})",
                hint="it was deleted: `blktx list --verify` shows what is left of the group snapshot",
            )
        if len(found) > 1:
            raise Refused(
                f"{image} has {len(found)} snapshots named {shown(name)} (ids {', '.join(bare(s.id) for s in found)})",
                hint='give id = "..." to say which',
            )
        snap = found[0]
        if snap.name != name or (date is not None and snap.date != date):
            made = f" made {_when(date)}" if date is not None else ""
            raise Refused(
                f"image {image}: snapshot id {bare(snap.id)} is now {snap.describe()}, not {shown(name)}{made}: "
                "the snapshot to revert to was deleted and its id taken by another; nothing was reverted",
                hint="`blktx list --verify` shows which members of the group snapshot are left",
            )
        safety = SAFETY.format(txid=ctx.txid)
        if any(s.name == safety for s in snaps):
            raise Refused(f"{image} already has a snapshot named {safety}")
        action.undo.update(
            {"real": real, "ident": header.ident, "snap": _ident(snap), "safety": safety, "before": [s.id for s in snaps]}
        )

    # -- do ----------------------------------------------------------------------------

    def do(self, action: Action, ctx: RunContext) -> None:
        image, undo = _image(action), action.undo
        safety, ident = undo["safety"], undo.get("ident")
        snaps = read_header(image)[1]
        if any(s.name == safety for s in snaps):
            raise ActionFailed(f"{image}: a snapshot named {safety} appeared after the check; it was left alone")
        # Durable before the image is touched: do began, and what was there. A snapshot
        # of the safety name with another id is from here on this action's.
        undo["present"] = [s.id for s in snaps]
        ctx.remember([action])
        _snapshot_cmd(image, ident, "-c", safety)
        new = [s for s in read_header(image)[1] if s.name == safety and s.id not in undo["present"]]
        if len(new) != 1:
            raise ActionFailed(f"{image}: qemu-img made the snapshot {safety}, but {len(new)} new ones have that name")
        # The state before the revert, by identity, durable before the data changes:
        # from here on cancel applies it back.
        undo["made"] = _ident(new[0])
        ctx.remember([action])
        self._apply(action, self._target(action), "the snapshot to revert to")

    def _apply(self, action: Action, snap: Snapshot, what: str) -> None:
        """Apply ``snap`` to the image, its identity read again just before (``-a``
        takes an id before a name: an id present names exactly that snapshot)."""
        image = _image(action)
        if not any(snap.same(s) for s in read_header(image)[1]):
            raise ActionFailed(f"{image}: {what}, {snap.describe()}, is gone or was replaced; nothing was applied")
        _snapshot_cmd(image, action.undo.get("ident"), "-a", snap.id)

    def _target(self, action: Action) -> Snapshot:
        sid, sec, nsec = action.undo["snap"]
        return Snapshot(sid, action.params["name"], (sec, nsec))

    def _made(self, action: Action) -> Snapshot | None:
        made = action.undo.get("made")
        if not isinstance(made, list):
            return None
        return Snapshot(made[0], action.undo["safety"], (made[1], made[2]))

    # -- cancel ------------------------------------------------------------------------

    def _judge(self, action: Action) -> tuple[list[Snapshot], list[Snapshot]]:
        """(safety snapshots provably this action's, ones that may be but cannot be proven)."""
        undo = action.undo
        if "present" not in undo:
            return [], []  # do never touched the image
        snaps = read_header(_image(action))[1]
        made = self._made(action)
        if made is not None:
            return [s for s in snaps if made.same(s)], []
        new = [s for s in snaps if s.name == undo["safety"] and s.id not in undo["present"]]
        return (new, []) if len(new) <= 1 else ([], new)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        undo = action.undo
        if "present" not in undo:
            return  # do never touched the image: a snapshot of the safety name is somebody else's
        image = _image(action)
        ours, unsure = self._judge(action)
        if unsure:
            raise ActionFailed(
                f"{image}: left {', '.join(s.describe() for s in unsure)}: blktx died while making its safety snapshot "
                f"and these cannot be told apart; the data was not reverted. Remove blktx's by hand "
                f"({_by_hand(image, unsure)}) and run blktx recover again"
            )
        made = self._made(action)
        if made is not None and not undo.get("restored"):
            if not ours:
                raise ActionFailed(
                    f"{image}: the state before the revert, {made.describe()}, is gone (deleted by hand?): "
                    "blktx cannot put it back; the image may hold the reverted data"
                )
            self._apply(action, made, "the state before the revert")
            # Durable before the safety snapshot goes: a cancel run again must not
            # apply it over what was written since.
            undo["restored"] = True
            ctx.remember([action])
        if ours:
            _delete_snapshots({action.index: [(image, s) for s in ours]}, [action], ctx.txid)

    # -- after the commit point ----------------------------------------------------------

    def finish(self, action: Action, ctx: RunContext) -> None:
        made = self._made(action)
        if made is None:
            return
        image = _image(action)
        if action.params["keep_current"]:
            action.output = (
                f"kept the state before the revert as snapshot {made.name} (id {bare(made.id)}, made {_when(made.date)}) "
                f"of {image}"
            )
            return
        if any(made.same(s) for s in read_header(image)[1]):
            _delete_snapshots({action.index: [(image, made)]}, [action], ctx.txid)

    def leftovers(self, action: Action) -> list[Leftover]:
        image = _image(action)
        try:
            ours, unsure = self._judge(action)
        except Refused as exc:
            return [
                Leftover(action.target, f"{image} cannot be read ({exc}); its safety snapshot is {action.undo.get('safety')}")
            ]
        reverted = self._made(action) is not None and not action.undo.get("restored")
        found = []
        for s in ours:
            if reverted:
                what = (
                    f"{s.describe()}: the state before the revert; the image holds the reverted data. Put it back: "
                    f"qemu-img snapshot -a {bare(s.id)} {image}, then remove it: {_by_hand(image, [s])}"
                )
            else:
                what = f"{s.describe()}: the state before the revert (the data is back); remove: {_by_hand(image, [s])}"
            found.append(Leftover(action.target, what))
        for s in unsure:
            found.append(
                Leftover(action.target, f"maybe blktx's safety snapshot: {s.describe()}; if so remove: {_by_hand(image, [s])}")
            )
        if reverted and not ours:
            found.append(Leftover(action.target, f"{image} holds the reverted data; the state before the revert is gone"))
        return found


#: The action types this module adds to the qcow2 plugin.
TYPES: tuple[type[ActionType], ...] = (InternalRevert,)
