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

A group is done image by image as above, but the images at once: every safety
snapshot through storage daemons (one QMP ``transaction`` per daemon, daemons at
once, as ``qcow2.internal-create`` makes snapshots), the journal written once
before and once after for all; then ``qemu-img snapshot -a`` on up to ``jobs``
(else one per CPU) images at once. Cancel applies back at once, journals that
once, and deletes in one batch of daemons; so does the first finish of a run for
every image its do reverted (bench/revert.py: no slower than a shell loop of
``qemu-img snapshot -a``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Leftover, Param, Refused, RunContext
from blktx.dispatch import dispatch
from blktx_plugins._daemons import Daemons, batches
from blktx_plugins._image import Snapshot, bare, check_chain, open_verified, read_header, shown
from blktx_plugins._qemu import VmGone, die_with_parent, holder
from blktx_plugins.qcow2 import _by_hand, _delete_snapshots, _fds_allow, _ident, _idents, _image

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


@functools.cache
def _trampoline() -> tuple[str, str] | None:
    """``setpriv`` (util-linux) with ``--pdeathsig``, and ``sh``; None without them."""
    setpriv, sh = shutil.which("setpriv"), shutil.which("sh")
    if setpriv is None or sh is None:
        return None
    try:  # an old setpriv without --pdeathsig, or a prctl refused here: the preexec_fn then
        out = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", sh, "-c", "exit 0"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (setpriv, sh) if out.returncode == 0 else None


def _dying_with_blktx(argv: list[str]) -> tuple[list[str], Any]:
    """``argv`` (and a ``preexec_fn``) so that the child gets SIGKILL when blktx dies,
    as :func:`~blktx_plugins._qemu.die_with_parent` does but without forking the whole
    interpreter (a ``preexec_fn`` rules out ``vfork``: ~3 ms a call): ``setpriv
    --pdeathsig KILL`` arms the signal, then a shell runs the command only while its
    parent is still blktx (blktx dead before the signal was armed: not run at all)."""
    tools = _trampoline()
    if tools is None:
        return argv, die_with_parent(os.getpid())
    setpriv, sh = tools
    return [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", '[ "$PPID" = "$0" ] && exec "$@"', str(os.getpid()), *argv], None


def _snapshot_cmd(image: str, ident: Any, *args: str) -> None:
    """``qemu-img snapshot ARGS`` on the file the check read (see the module's docstring)."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ActionFailed("qemu-img is not installed (Debian package qemu-utils)")
    fd = open_verified(image, ident if isinstance(ident, list) else None)
    try:
        node = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
        spec = "json:" + json.dumps(node)
        argv, preexec = _dying_with_blktx([exe, "snapshot", *args, spec])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, pass_fds=(fd,), preexec_fn=preexec)
    finally:
        os.close(fd)
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().replace(spec, image).replace(f"/proc/self/fd/{fd}", image)
        raise ActionFailed(f"{image}: qemu-img snapshot {' '.join(args)}: {why or f'exit {out.returncode}'}")


#: The run's resource (:meth:`RunContext.resource`) where do leaves its actions for finish.
_FINISH = "qcow2.internal-revert/finish"


class _Finish:
    """The actions this run's do reverted: the first finish deletes all their safety
    snapshots in one batch of storage daemons, and each finish reports its own outcome."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actions: dict[int, Action] = {}
        self.ran = False
        self.outcome: dict[int, BaseException | None] = {}


def _one(many: Any, action: Action, ctx: RunContext) -> None:
    """A batch step on one action, its own failure raised as it is."""
    try:
        many([action], ctx)
    except ActionFailures as exc:
        if action.index in exc.failures:
            raise exc.failures[action.index] from None
        raise


def _each_image(
    actions: list[Action], ctx: RunContext, work: Any, stop: bool = True
) -> tuple[dict[int, BaseException], list[int]]:
    """Call ``work`` on each action, up to ``jobs`` (else one per CPU) at once: each is
    a ``qemu-img`` on its own image. Return the failures, and (``stop``: none starts
    after one failed) the actions not begun."""
    failures: dict[int, BaseException] = {}
    skipped: list[int] = []
    lock = threading.Lock()

    def one(a: Action) -> None:
        with lock:
            if stop and failures:
                skipped.append(a.index)
                return
        try:
            work(a)
        except Exception as exc:  # noqa: BLE001 - reported per action
            with lock:
                failures[a.index] = exc

    workers = min(len(actions), ctx.options.jobs if ctx.options.jobs > 1 else (os.cpu_count() or 1))
    dispatch(actions, one, workers, name="blktx-qemu-img")
    return failures, skipped


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

    def catalog_member(self, action: Action) -> dict[str, Any] | None:
        """With keep_current, the safety snapshot as the qcow2.internal-create member that
        could have made it (by its id and date), to revert to or delete; else nothing."""
        made = self._made(action)
        if not action.params["keep_current"] or made is None:
            return None
        return {
            "index": action.index,
            "type": "qcow2.internal-create",
            "target": action.target,
            "params": {"image": action.params["image"], "name": made.name, "replace": False},
            "identity": {"made": [[made.id, made.date[0], made.date[1]]]},
        }

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

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        _fds_allow(actions, ctx)  # do's storage daemons must be able to open every image
        super().check_many(actions, ctx)

    def do(self, action: Action, ctx: RunContext) -> None:
        _one(self.do_many, action, ctx)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Every safety snapshot through storage daemons (one QMP ``transaction`` each,
        all at once), then the group's snapshot applied to each image, several
        ``qemu-img`` at once. Each image is independent: the journal and cancel make
        the group all or none."""
        todo = list(actions)
        self._safety_snapshots(todo, ctx)
        failures, skipped = _each_image(todo, ctx, lambda a: self._apply(a, self._target(a), "the snapshot to revert to"))
        if failures:
            # Those skipped hold only their safety snapshot (journaled), as after a do
            # stopped half-way: cancel removes it.
            raise ActionFailures(failures, skipped)
        pending = ctx.resource(_FINISH, _Finish)
        with pending.lock:
            pending.actions.update((a.index, a) for a in todo)

    def _safety_snapshots(self, actions: list[Action], ctx: RunContext) -> None:
        """Make each image's safety snapshot, its identity durable before any data changes."""
        daemons = Daemons(batches(sorted({_image(a) for a in actions}), ctx.options.jobs), ctx.txid, _idents(actions))
        # From here until close each daemon holds its images' locks: nobody else can
        # add a snapshot, so the one new snapshot of the safety name is QEMU's, made for us.
        failures: dict[int, BaseException] = {}
        made: dict[str, list[Snapshot]] = {}
        try:
            present = {a.index: read_header(_image(a))[1] for a in actions}
            for a in actions:
                if any(s.name == a.undo["safety"] for s in present[a.index]):
                    failures[a.index] = ActionFailed(
                        f"{_image(a)}: a snapshot named {a.undo['safety']} appeared after the check; it was left alone"
                    )
            if failures:  # nothing touched: without "present" cancel does nothing
                raise ActionFailures(failures, [a.index for a in actions if a.index not in failures])
            for a in actions:
                a.undo["present"] = [s.id for s in present[a.index]]
            # Durable before any image is touched: do began, and what was there. A
            # snapshot of the safety name with another id is from here on this action's.
            ctx.remember(actions)
            for acts, reply in daemons.snapshot([(a, _image(a), a.undo["safety"]) for a in actions]):
                for a in acts:
                    if isinstance(reply, ActionFailed):
                        # refused (all or nothing) or died half-way (VmGone): without
                        # "made", cancel removes the one new snapshot of the safety name
                        failures[a.index] = ActionFailed(f"{_image(a)}: {reply}") if not isinstance(reply, VmGone) else reply
                        continue
                    before = a.undo["present"]
                    new = [s for s in read_header(_image(a))[1] if s.name == a.undo["safety"] and s.id not in before]
                    if len(new) != 1:
                        failures[a.index] = ActionFailed(
                            f"{_image(a)}: QEMU made the snapshot {a.undo['safety']}, but {len(new)} new ones have that name"
                        )
                        continue
                    # The state before the revert, by identity (read under the lock):
                    # once journaled, cancel applies it back.
                    a.undo["made"] = _ident(new[0])
            if not failures:  # else rolled back: cancel deletes them
                made = {_image(a): [s] for a in actions if (s := self._made(a)) is not None}
        finally:
            # Once each daemon has exited, the safety snapshots get VM clock 0 (as
            # qemu-img's), not the host clock it recorded (cosmetic; before any -a).
            daemons.close(made)
        # Durable before any data changes, one write for all; after the daemons closed
        # the images (a run killed here leaves them consistent, without leaked
        # clusters). Killed before it, cancel finds each one by its name, as above.
        ctx.remember(actions)
        if failures:
            # The others hold only their safety snapshot (journaled): they stay as a do
            # stopped half-way would, and cancel removes it.
            raise ActionFailures(failures, [a.index for a in actions if a.index not in failures])

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
        _one(self.cancel_many, action, ctx)

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        """Each image as alone, the images at once: the states before the revert applied
        back (several ``qemu-img`` at once), that made durable in one write, then the
        safety snapshots deleted in one batch of storage daemons."""
        failures: dict[int, BaseException] = {}
        ours: dict[int, list[Snapshot]] = {}
        restore: list[Action] = []
        for a in actions:
            if "present" not in a.undo:
                continue  # do never touched the image: a snapshot of the safety name is somebody else's
            image = _image(a)
            try:
                found, unsure = self._judge(a)
                if unsure:
                    raise ActionFailed(
                        f"{image}: left {', '.join(s.describe() for s in unsure)}: blktx died while making its safety "
                        f"snapshot and these cannot be told apart; the data was not reverted. Remove blktx's by hand "
                        f"({_by_hand(image, unsure)}) and run blktx recover again"
                    )
                made = self._made(a)
                if made is not None and not a.undo.get("restored"):
                    if not found:
                        raise ActionFailed(
                            f"{image}: the state before the revert, {made.describe()}, is gone (deleted by hand?): "
                            "blktx cannot put it back; the image may hold the reverted data"
                        )
                    restore.append(a)
            except Exception as exc:  # noqa: BLE001 - reported per action
                failures[a.index] = exc
                continue
            ours[a.index] = found
        failed, _ = _each_image(restore, ctx, self._restore, stop=False)
        failures.update(failed)
        restored = [a for a in restore if a.index not in failed]
        for a in restored:
            a.undo["restored"] = True
        # Durable before any safety snapshot goes: a cancel run again must not apply
        # one over what was written since.
        ctx.remember(restored)
        plan = {i: [(_image(a), s) for s in ours[i]] for a in actions if (i := a.index) in ours and i not in failures and ours[i]}
        try:
            _delete_snapshots(plan, [a for a in actions if a.index in plan], ctx.txid, ctx.options.jobs)
        except ActionFailures as exc:
            failures.update(exc.failures)
        if failures:
            raise ActionFailures(failures)

    def _restore(self, action: Action) -> None:
        made = self._made(action)
        assert made is not None  # only actions whose safety snapshot is journaled are restored
        self._apply(action, made, "the state before the revert")

    # -- after the commit point ----------------------------------------------------------

    def finish(self, action: Action, ctx: RunContext) -> None:
        """The safety snapshot deleted (or kept, ``keep_current``). The first finish of
        a run deletes those of every action its do reverted, in one batch of storage
        daemons (the finalize intent journaled before it covers them all); each finish
        then reports its own. One without (``blktx recover``, a retry) works alone."""
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
        pending = ctx.resource(_FINISH, _Finish)
        with pending.lock:
            if not pending.ran and pending.actions.get(action.index) is action:
                pending.ran = True
                batch = [a for a in pending.actions.values() if not a.params["keep_current"] and self._made(a) is not None]
                pending.outcome = self._drop_safety(batch, ctx)
            batched = action.index in pending.outcome
            error = pending.outcome.pop(action.index, None)
        if batched:
            if error is not None:
                raise error
            return
        if any(made.same(s) for s in read_header(image)[1]):
            _delete_snapshots({action.index: [(image, made)]}, [action], ctx.txid)

    def _drop_safety(self, actions: list[Action], ctx: RunContext) -> dict[int, BaseException | None]:
        """Delete the safety snapshots of ``actions`` (those still there) at once: each one's outcome."""
        outcome: dict[int, BaseException | None] = {a.index: None for a in actions}
        plan: dict[int, list[tuple[str, Snapshot]]] = {}
        for a in actions:
            made = self._made(a)
            try:
                if made is not None and any(made.same(s) for s in read_header(_image(a))[1]):
                    plan[a.index] = [(_image(a), made)]
            except Exception as exc:  # noqa: BLE001 - reported by that action's finish
                outcome[a.index] = exc
        try:
            _delete_snapshots(plan, [a for a in actions if a.index in plan], ctx.txid, ctx.options.jobs)
        except ActionFailures as exc:
            outcome.update(exc.failures)
        except Exception as exc:  # noqa: BLE001 - every planned one failed (e.g. no daemon started)
            outcome.update({i: exc for i in plan})
        return outcome

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
