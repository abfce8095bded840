"""``qcow2``: internal and external snapshots of qcow2 image files, offline.

Internal snapshots of a whole group are made by ``qemu-storage-daemon``: the
images are split into batches (``jobs``, else two per core from two to eight, and
more when the limit of open files needs it), one daemon and one QMP
``transaction`` per batch, all daemons at once; blktx's journal and cancel keep
the all-or-none guarantee across the batches and every other action. Checks read
the qcow2 headers directly (no process, read-only) and refuse an image that QEMU's
image locking says is in use.

External snapshots keep the layout documented in docs/backends.md: ``device`` is a
stable symlink that users open; the new overlay's backing file is the image the
link points to, and invalidate re-points the link atomically (``rename(2)`` of a
new symlink over it). A ``blktx_switch_active_image`` hook can switch a management
stack's own configuration instead.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionFailures, ActionType, Leftover, Param, Refused, Register, RunContext, hookimpl
from blktx_plugins._daemons import Daemons, batches, fd_problem
from blktx_plugins._fs import DeviceLink, is_ours, private_file, publish, remove_if_ours
from blktx_plugins._image import (
    Header,
    Snapshot,
    bare,
    check_chain,
    is_utf8,
    name_problem,
    open_verified,
    read_header,
    read_image,
    read_images,
    shown,
)
from blktx_plugins._qemu import (
    VmGone,
    backing_name,
    check_writable_image,
    create_overlay,
    heartbeat_bound,
    holder,
    image_format,
    qemu_img,
    remove_daemon_folders,
)


def _per_action(actions: Sequence[Action], step: Any) -> None:
    """Run ``step`` on each action, collecting failures the way the executor wants them."""
    failures: dict[int, BaseException] = {}
    for a in actions:
        try:
            step(a)
        except Exception as exc:  # noqa: BLE001 - reported per action
            failures[a.index] = exc
    if failures:
        raise ActionFailures(failures)


def _image(a: Action) -> str:
    """The image file the check resolved (every symlink followed), else the parameter."""
    return str(a.undo.get("real") or a.params["image"])


def _idents(actions: Sequence[Action]) -> dict[str, list[int]]:
    """Each checked image's identity (device, inode), by resolved path."""
    return {_image(a): list(a.undo["ident"]) for a in actions if isinstance(a.undo.get("ident"), list)}


def _fds_allow(actions: Sequence[Action], ctx: RunContext) -> None:
    """Refuse, naming the limit, a group whose storage daemons could not open its
    images within the limit of open files (rather than fail at do)."""
    problem = fd_problem(len({a.params["image"] for a in actions}), ctx.options.jobs)
    if problem:
        raise Refused(problem, hint="raise the limit: ulimit -n N in the shell, LimitNOFILE= for a service")


def _checked(a: Action, ctx: RunContext, read: dict[str, Header | BaseException] | None = None) -> Header:
    """Check ``a``'s image (and its chain) as a writable, unused qcow2 image under the
    roots; record what it resolved to and its identity; return its header. ``read``:
    the headers of the group's images, read in one batch (:func:`_read_all`)."""
    real = os.path.realpath(a.params["image"])
    header = check_writable_image(real, ctx.options.roots, (read or {}).get(real))
    a.undo["real"], a.undo["ident"] = real, header.ident
    return header


def _read_all(paths: Sequence[str]) -> dict[str, Header | BaseException]:
    """The headers of ``paths`` read in one batch (one reader hand-off, not one each)."""
    unique = sorted(set(paths))
    return dict(zip(unique, read_images(unique), strict=True))


def _delete_snapshots(plan: dict[int, list[tuple[str, Snapshot]]], actions: Sequence[Action], txid: str, jobs: int = 1) -> None:
    """Delete exactly the listed snapshots, the images spread over storage daemons
    that work at once (:mod:`~blktx_plugins._daemons`): each snapshot is re-read
    under its daemon's lock and deleted only while its id, name (and date, when
    known) are still the listed ones."""
    images = sorted({image for todo in plan.values() for image, _ in todo})
    if not images:
        return
    idents = _idents(actions)
    for attempt in range(10):
        try:
            daemons = Daemons(batches(images, jobs), txid, idents)
            break
        except ActionFailed:
            # A killed run's daemon may hold an image's lock for a moment more: wait
            # while some process holds one (QEMU's lock bytes say so), never longer.
            if attempt == 9 or not any(holder(image) for image in images):
                raise
            time.sleep(0.3)
    failures: dict[int, BaseException] = {}
    try:
        read = _read_all(images)
        headers = {image: h for image, h in read.items() if not isinstance(h, BaseException)}
        for h in read.values():
            if isinstance(h, BaseException):
                raise h
        calls: dict[Any, list[tuple[Any, str, dict[str, Any]]]] = {}
        for a in actions:
            for image, snap in plan.get(a.index, []):
                if image in idents and headers[image].ident != idents[image]:
                    failures[a.index] = ActionFailed(f"{image} was replaced since the check; left alone")
                    continue
                if not any(_same(snap, s) for s in headers[image].snapshots):
                    continue  # gone already, or its id now names another point in time
                # Under the daemon's lock the id names this very snapshot (just read);
                # QMP carries UTF-8 only, so a name that is not is left out.
                which = {"id": snap.id, "name": snap.name} if is_utf8(snap.name) else {"id": snap.id}
                calls.setdefault(daemons.of[image], []).append(
                    (
                        (a.index, image, snap.id),
                        "blockdev-snapshot-delete-internal-sync",
                        {"device": daemons.node(image), **which},
                    )
                )
        for (index, image, _), reply in daemons.each(calls).items():
            if isinstance(reply, ActionFailed) and index not in failures:
                failures[index] = ActionFailed(f"{image}: {reply}")
    finally:
        daemons.close()
    if failures:
        raise ActionFailures(failures)


def _same(wanted: Snapshot, found: Snapshot) -> bool:
    return wanted.same(found) if wanted.date != (0, 0) else (wanted.id, wanted.name) == (found.id, found.name)


def _ident(s: Snapshot) -> list[Any]:
    """A snapshot's identity as the journal keeps it: id, date seconds, date nanoseconds."""
    return [s.id, s.date[0], s.date[1]]


def _micros(s: Snapshot) -> int:
    return s.date[0] * 1_000_000 + s.date[1] // 1000


def _by_hand(image: str, snaps: list[Snapshot]) -> str:
    """How to delete exactly these snapshots by hand. ``qemu-img snapshot -d`` takes
    a name: exact only while no other snapshot of the image shares it."""
    try:
        names = [s.name for s in read_header(image)[1]]
    except Refused:
        names = []
    return " && ".join(
        f"qemu-img snapshot -d {shlex.quote(s.name)} {shlex.quote(image)}"
        if names.count(s.name) == 1 and s.name.isprintable() and is_utf8(s.name)
        else f"QMP blockdev-snapshot-delete-internal-sync with id {bare(s.id)} on {image}"
        for s in snaps
    )


class InternalCreate(ActionType):
    """Create a named internal snapshot in a qcow2 image (one QEMU transaction per storage daemon, daemons at once).

    Ownership: a cancel deletes only a snapshot whose id *and* date ``do`` recorded
    (``undo["made"]``, journaled with ``ctx.remember`` while the image's lock was
    still held, so nobody else could have added one). ``undo["started"]`` is made
    durable before the image is touched: without it, ``do`` never ran and any
    snapshot of the name is somebody else's. With it but without ``made`` (blktx
    died inside ``do``), a new snapshot of the name cannot be told from one made by
    hand after the crash, unless its date proves it: the daemon held the image's
    lock from ``started`` until it died with blktx, a moment its heartbeat file
    bounds (``undo["heartbeat"]``). One new snapshot of the name dated in between is
    ours; otherwise cancel leaves it and fails, naming it exactly (id, date) and how
    to remove it, so ``blktx recover`` reports it instead of guessing.
    """

    name = "qcow2.internal-create"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    shares_target = True
    revert_type = "qcow2.internal-revert"
    delete_type = "qcow2.internal-delete"
    params = (
        Param("image", "path", required=True, doc="the qcow2 image file"),
        Param("name", "str", required=True, doc="the snapshot's name"),
        Param(
            "replace",
            "bool",
            default=False,
            doc="replace a snapshot of the same name: the old one is deleted only after the commit point",
        ),
    )

    def target(self, action: Action) -> str:
        return str(action.params["image"])

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        _fds_allow(actions, ctx)
        names: dict[tuple[str, str], int] = {}
        read = _read_all([os.path.realpath(a.params["image"]) for a in actions])

        def check(a: Action) -> None:
            image, name = a.params["image"], a.params["name"]
            problem = name_problem(name)
            if problem:
                raise Refused(
                    f"{self.name} action #{a.index} on {image}: the snapshot name {shown(name)} {problem}",
                    hint="give a non-empty UTF-8 name of at most 255 bytes",
                )
            header = _checked(a, ctx, read)
            snaps = header.snapshots
            if header.data_file is not None:
                raise Refused(
                    f"{image} keeps its data in an external data file: QEMU makes no internal snapshots of such an image"
                )
            same = [s for s in snaps if s.name == name]
            if same and not a.params["replace"]:
                raise Refused(
                    f"{image} already has a snapshot named {shown(name)} (id {', '.join(bare(s.id) for s in same)})",
                    hint="set replace = true to replace it; the old one is deleted after the commit point",
                )
            if (image, name) in names:
                raise Refused(f"action #{names[image, name]} already creates {name!r} in {image}")
            names[image, name] = a.index
            a.undo["before"] = [s.id for s in snaps]
            a.undo["old"] = [_ident(s) for s in same]

        _per_action(actions, check)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        # QMP refuses a second snapshot of the same name, so a replacement is made with
        # qemu-img (which allows it); everything else in one daemon transaction.
        fresh = [a for a in actions if not a.undo.get("old")]
        replacing = [a for a in actions if a.undo.get("old")]
        if fresh:
            try:
                self._do_fresh(fresh, ctx)
            except ActionFailures as exc:  # some daemons' batches failed: the replacements never began
                raise ActionFailures(exc.failures, [a.index for a in replacing]) from None
        if replacing:
            self._do_replace(replacing, ctx)

    def _started(self, actions: list[Action], ctx: RunContext, heartbeat: dict[str, str] | None = None) -> None:
        """Durable before anything changes an image: do has begun, the ids there now,
        and (daemon) the heartbeat file, by image, that will bound when its daemon's
        locks were released."""
        read = _read_all([_image(a) for a in actions])
        for a in actions:
            header = read[_image(a)]
            if isinstance(header, BaseException):
                raise header
            a.undo["present"] = [s.id for s in header.snapshots]
            a.undo["started"] = time.time()
            if heartbeat:
                a.undo["heartbeat"] = heartbeat[_image(a)]
        ctx.remember(actions)

    def _do_fresh(self, fresh: list[Action], ctx: RunContext) -> None:
        # Several daemons, each with a batch of the images and one QMP transaction,
        # all at once; one journal write before and one after, for all of them.
        daemons = Daemons(batches(sorted({_image(a) for a in fresh}), ctx.options.jobs), ctx.txid, _idents(fresh))
        # From here until close each daemon holds its images' locks: nobody else can
        # add a snapshot, so the new one of each name is QEMU's, made for us.
        made: dict[str, list[Snapshot]] = {}
        try:
            self._started(fresh, ctx, {image: d.heartbeat for image, d in daemons.of.items()})
            failures: dict[int, BaseException] = {}
            for acts, reply in daemons.snapshot([(a, _image(a), a.params["name"]) for a in fresh]):
                if isinstance(reply, ActionFailed):
                    for a in acts:
                        failures[a.index] = reply
                        if not isinstance(reply, VmGone):  # refused (all or nothing), not died half-way
                            a.undo["made"] = []
                else:
                    read = _read_all([_image(a) for a in acts])
                    for a in acts:
                        a.undo["made"] = [_ident(s) for s in self._new(a, read)]
            ctx.remember(fresh)  # before close releases the locks
            if failures:
                raise ActionFailures(failures)
            # Once each daemon has exited, its snapshots get VM clock 0 (as qemu-img's),
            # not the host clock it recorded; found by id, name and date, as journaled.
            made = {_image(a): [Snapshot(m[0], a.params["name"], (m[1], m[2])) for m in a.undo["made"]] for a in fresh}
        finally:
            daemons.close(made)
            unknown = [a for a in fresh if "made" not in a.undo]
            if unknown:
                # A daemon died under us (close has reaped it): its locks are gone by
                # now, which bounds what it can have made, once its folder is removed.
                for a in unknown:
                    a.undo["released"] = time.time()
                with contextlib.suppress(Exception):  # without it cancel stays conservative
                    ctx.remember(unknown)

    def _do_replace(self, replacing: list[Action], ctx: RunContext) -> None:
        self._started(replacing, ctx)
        try:
            for a in replacing:
                image, name = _image(a), a.params["name"]
                present = {s.id for s in read_header(image)[1]}
                # qemu-img opens the checked file through a descriptor, not the path
                fd = open_verified(image, a.undo.get("ident"))
                t0 = time.time_ns() // 1000
                try:
                    qemu_img("snapshot", "-c", name, f"/proc/self/fd/{fd}", pass_fds=(fd,))
                except ActionFailed as exc:
                    a.undo["made"] = []
                    raise ActionFailed(str(exc).replace(f"/proc/self/fd/{fd}", image)) from None
                finally:
                    os.close(fd)
                t1 = time.time_ns() // 1000 + 1
                # qemu-img held the image's lock while it ran, inside [t0, t1]: a new
                # snapshot of this name dated in there can only be the one it made.
                new = [s for s in read_header(image)[1] if s.name == name and s.id not in present and t0 <= _micros(s) <= t1]
                if len(new) != 1:
                    raise ActionFailed(
                        f"{image}: qemu-img made snapshot {name!r}, but it cannot be told apart "
                        f"({len(new)} candidates dated while it ran)"
                    )
                a.undo["made"] = [_ident(new[0])]
        finally:
            ctx.remember(replacing)

    def _new(self, a: Action, read: dict[str, Header | BaseException] | None = None) -> list[Snapshot]:
        """Snapshots of this action's name that were not there when do started
        (``read``: the image's header from a batch, else read now)."""
        known = set(a.undo.get("present", a.undo.get("before", [])))
        header = (read or {}).get(_image(a))
        if header is None:
            try:
                header = read_image(_image(a))
            except Refused:
                return []
        if isinstance(header, Refused):
            return []
        if isinstance(header, BaseException):
            raise header
        return [s for s in header.snapshots if s.name == a.params["name"] and s.id not in known]

    def _judge(self, a: Action) -> tuple[list[Snapshot], list[Snapshot]]:
        """(what is provably this action's, what may be but cannot be proven)."""
        if "made" in a.undo:
            made = {tuple(m) for m in a.undo["made"] if isinstance(m, list)}
            return [s for s in self._new(a) if tuple(_ident(s)) in made], []
        if "started" not in a.undo:
            return [], []  # do never touched the image: one of this name is somebody else's
        new = self._new(a)
        # blktx died inside do. From "started" until its daemon's locks were released
        # no other QEMU tool could add a snapshot to the image, and the daemon makes
        # at most one of the name: the one new snapshot dated in that span is ours.
        until = a.undo.get("released")
        if not isinstance(until, (int, float)) and isinstance(a.undo.get("heartbeat"), str):
            until = heartbeat_bound(a.undo["heartbeat"])
        if not isinstance(until, (int, float)):
            return [], new  # the release cannot be bounded (no heartbeat): not provable
        start = a.undo["started"]
        inside = [s for s in new if start - 1e-6 <= _micros(s) / 1e6 <= until]  # QEMU keeps micros
        if len(inside) != 1:
            # None inside: any new one is dated after the bound, so the daemon did not
            # make it unless the heartbeat thread was starved; reported, not guessed.
            return [], new
        # Any other new one is dated after the locks were released: somebody else's.
        return inside, []

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        failures: dict[int, BaseException] = {}
        plan: dict[int, list[tuple[str, Snapshot]]] = {}
        for a in actions:
            ours, unsure = self._judge(a)
            plan[a.index] = [(_image(a), s) for s in ours]
            if unsure:
                failures[a.index] = ActionFailed(
                    f"{a.params['image']}: left {', '.join(s.describe() for s in unsure)}: blktx died while making "
                    f"its snapshot, and this one cannot be proven to be it rather than one made since. If it is "
                    f"blktx's, remove it by hand ({_by_hand(_image(a), unsure)}) and run blktx recover again"
                )
        try:
            _delete_snapshots(plan, actions, ctx.txid, ctx.options.jobs)
        except ActionFailures as exc:
            failures.update(exc.failures)
        if failures:
            raise ActionFailures(failures)

    def finish(self, action: Action, ctx: RunContext) -> None:
        old = [
            Snapshot(o[0], action.params["name"], (o[1], o[2])) if isinstance(o, list) else Snapshot(o, action.params["name"])
            for o in action.undo.get("old", [])
        ]
        if old:
            _delete_snapshots({action.index: [(_image(action), s) for s in old]}, [action], ctx.txid, ctx.options.jobs)

    def member_exists(self, action: Action) -> bool | None:
        """The snapshot this committed action made (its id and date, as journaled) is
        still in the image; a same-named one made since is not it."""
        made = {tuple(m) for m in action.undo.get("made", []) if isinstance(m, list)}
        return bool(made) and any(tuple(_ident(s)) in made for s in self._new(action))

    def revert_params(self, action: Action) -> dict[str, Any]:
        """The snapshot this committed action made, by identity: its id *and* date (``undo["made"]``)."""
        from blktx_plugins._qcow2_revert import date_text

        made = [m for m in action.undo.get("made", []) if isinstance(m, list) and len(m) == 3]
        if len(made) != 1:
            raise ValueError(f"the journal records no single snapshot made in {action.params['image']} ({made})")
        sid, sec, nsec = made[0]
        return {"image": action.params["image"], "name": action.params["name"], "id": sid, "date": date_text((sec, nsec))}

    delete_params = revert_params

    def leftovers(self, action: Action) -> list[Leftover]:
        ours, unsure = self._judge(action)
        image = _image(action)
        return [Leftover(action.target, f"{s.describe()}; remove: {_by_hand(image, [s])}") for s in ours] + [
            Leftover(action.target, f"maybe blktx's: {s.describe()}; if so remove: {_by_hand(image, [s])}") for s in unsure
        ]


class InternalDelete(ActionType):
    """Delete an internal snapshot of a qcow2 image (finalize: runs after the commit point)."""

    name = "qcow2.internal-delete"
    finalize = True
    shares_target = True
    params = (
        Param("image", "path", required=True, doc="the qcow2 image file"),
        Param("name", "str", default="", doc="the snapshot's name"),
        Param("id", "str", default="", doc="the snapshot's id (needed when several share the name)"),
        Param("date", "str", default="", doc='when QEMU made it, "SEC.NSEC": a snapshot of that id with another date is refused'),
    )

    def target(self, action: Action) -> str:
        return str(action.params["image"])

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        from blktx_plugins._qcow2_revert import refuse_other_date

        _fds_allow(actions, ctx)

        def check(a: Action) -> None:
            image, name, sid = a.params["image"], a.params["name"], a.params["id"]
            if not name and not sid:
                raise Refused("give the snapshot's name or id", hint='name = "..." or id = "..."')
            snaps = _checked(a, ctx).snapshots
            found = [s for s in snaps if (not name or s.name == name) and (not sid or s.id == sid)]
            if not found:
                listed = ", ".join(f"{bare(s.id)}:{shown(s.name)}" for s in snaps) or "none"
                raise Refused(f"{image} has no snapshot {name or ''}{' id ' + sid if sid else ''} (it has: {listed})")
            if len(found) > 1:
                raise Refused(
                    f"{image} has {len(found)} snapshots named {shown(name)} (ids {', '.join(bare(s.id) for s in found)})",
                    hint='give id = "..." to say which',
                )
            refuse_other_date(a, image, found[0])  # the catalog deletes by identity: id *and* date
            if (image, found[0].id) in claimed:
                raise Refused(
                    f"conflicts with action #{claimed[image, found[0].id]}: both delete snapshot "
                    f"{shown(found[0].name)} (id {bare(found[0].id)}) of {image}"
                )
            claimed[image, found[0].id] = a.index
            a.undo["id"], a.undo["name"], a.undo["date"] = found[0].id, found[0].name, list(found[0].date)

        claimed: dict[tuple[str, str], int] = {}
        _per_action(actions, check)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        plan: dict[int, list[tuple[str, Snapshot]]] = {}
        for a in actions:
            _, snaps, _ = read_header(_image(a))
            date = a.undo.get("date", [0, 0])
            target = Snapshot(a.undo["id"], a.undo["name"], (date[0], date[1]))
            # gone already (a retry): done; never another point in time that took its id
            plan[a.index] = [(_image(a), target)] if any(_same(target, s) for s in snaps) else []
        _delete_snapshots(plan, actions, ctx.txid, ctx.options.jobs)


class ExternalCreate(DeviceLink, ActionType):
    """Create a qcow2 overlay on top of a device's current image and make it the active image."""

    name = "qcow2.external-create"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    revert_type = "qcow2.external-revert"
    delete_type = "qcow2.external-delete"
    params = (
        Param("device", "path", required=True, doc="the stable symlink that users open; it points to the current image"),
        Param("overlay", "path", required=True, doc="the new overlay file to create", creates=True),
        Param("reuse", "bool", default=False, doc="use an existing overlay file whose backing file is the current image"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["device"])

    def check(self, action: Action, ctx: RunContext) -> None:
        device, overlay = action.params["device"], action.params["overlay"]
        if not os.path.islink(device):
            hint = (
                (
                    f"keep the image as a file and point a symlink at it: mv {device} {device}.base.qcow2 && "
                    f"ln -s {os.path.basename(device)}.base.qcow2 {device}"
                )
                if os.path.exists(device)
                else "check the path"
            )
            raise Refused(f"device {device} is not a symlink", hint=hint)
        current = os.path.realpath(device)
        if not os.path.exists(current):
            raise Refused(f"device {device} points to {current}, which does not exist")
        fmt, size, ident = image_format(current)
        opens: list[str] = []
        if fmt == "qcow2":  # as QEMU opens it: through the device, backing names joined to its folder
            check_chain(current, ctx.options.roots, opened_as=device, opens=opens)
        who = holder(current)
        if who:
            raise Refused(f"{current} is in use by {who}", hint="use qmp.external-create for a running VM")
        if os.path.realpath(overlay) == current:
            raise Refused("the overlay is the current image")
        exists = os.path.lexists(overlay)
        if exists and not action.params["reuse"]:
            raise Refused(f"overlay {overlay} already exists", hint="choose a new name, or set reuse = true to use it")
        here = os.path.dirname(os.path.abspath(device))  # QEMU will open the overlay through the device
        if exists:
            backing = check_chain(overlay, ctx.options.roots, opened_as=device).backing
            if backing is None or os.path.realpath(os.path.join(here, backing)) != current:
                raise Refused(f"overlay {overlay} is backed by {shown(backing or '')}, not by the current image {current}")
            after = os.path.join(here, backing)
        elif not os.access(os.path.dirname(overlay), os.W_OK):
            raise Refused(f"cannot create files in {os.path.dirname(overlay)}")
        else:
            after = os.path.join(here, backing_name(overlay, current)) if self._relative_backing(action) else current
        if fmt == "qcow2" and os.path.realpath(os.path.dirname(after)) != os.path.realpath(here):
            # QEMU will open the current image by the overlay's name for it: its own
            # relative names then join another folder. They must still name what they do.
            then: list[str] = []
            check_chain(current, ctx.options.roots, opened_as=after, opens=then)
            if then != opens:
                raise Refused(
                    f"{current} names its backing or data files relative to the device's folder {here}; "
                    f"opened through the overlay they would be {', '.join(then) or 'none'}, not {', '.join(opens)}",
                    hint="name them absolutely (qemu-img rebase -u -F FMT -b /PATH IMAGE), or keep the overlay beside the device",
                )
        # Private names, unique to this action and recorded before they are created:
        # the overlay when the filesystem has no unnamed files, and the symlink swap.
        token = f"blktx-{ctx.txid}-{os.urandom(4).hex()}"
        action.undo.update(
            {
                "link": os.readlink(device),
                "old": current,
                "format": fmt,
                "preexisting": exists,
                "size": size,
                "ident": ident,
                "tmp": f"{overlay}.{token}",
                "swap": f"{device}.{token}",
            }
        )

    def do(self, action: Action, ctx: RunContext) -> None:
        if action.undo["preexisting"]:
            return
        overlay = action.params["overlay"]
        private = private_file(overlay, action.undo["tmp"])
        try:
            # The overlay's identity is durable before it can appear under its name:
            # cancel removes the file at that name only if it is this very inode.
            action.undo["made"] = private.ident
            ctx.remember([action])
            # The overlay will name the current image by path: it must still be the
            # file the check read (and whose chain it confined).
            os.close(open_verified(action.undo["old"], action.undo.get("ident")))
            size = action.undo.get("size")
            if not isinstance(size, int):  # journaled by an older version
                size = image_format(action.undo["old"])[1]
            create_overlay(private, overlay, action.undo["old"], action.undo["format"], size, self._relative_backing(action))
            try:
                publish(private, overlay)
            except FileExistsError:
                raise ActionFailed(f"overlay {overlay} appeared after the check; it was left alone") from None
        finally:
            private.close()

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        device, overlay = action.params["device"], action.params["overlay"]
        if ctx.hook is not None and ctx.hook.blktx_switch_active_image(
            ctx=ctx, action=action, device=device, old=action.undo["old"], new=overlay
        ):
            return
        self._switch(action)

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if "old" not in action.undo:
            return  # never checked: nothing was done
        device, overlay = action.params["device"], action.params["overlay"]
        switched = ctx.hook is not None and ctx.hook.blktx_switch_active_image(
            ctx=ctx, action=action, device=device, old=overlay, new=action.undo["old"]
        )
        self._switch_back(action, hooked=switched)
        made = action.undo.get("made")
        if not action.undo.get("preexisting"):
            remove_if_ours(overlay, made)
            remove_if_ours(action.undo.get("tmp", ""), made)

    def member_exists(self, action: Action) -> bool | None:
        """Its point in time is still there (:func:`blktx_plugins._qcow2_external.member_exists`)."""
        from blktx_plugins import _qcow2_external as ext

        return ext.member_exists(action)

    def revert_params(self, action: Action) -> dict[str, Any]:
        from blktx_plugins import _qcow2_external as ext

        return ext.revert_params(action)

    def delete_params(self, action: Action) -> dict[str, Any]:
        from blktx_plugins import _qcow2_external as ext

        return ext.delete_params(action)

    def leftovers(self, action: Action) -> list[Leftover]:
        found = []
        overlay, device, made = action.params["overlay"], action.params["device"], action.undo.get("made")
        if self._points_to_ours(action):
            found.append(Leftover(action.target, f"device symlink points to the overlay {overlay}"))
        if is_ours(overlay, made) and not action.undo.get("preexisting"):
            found.append(Leftover(action.target, f"overlay file {overlay}"))
        if is_ours(action.undo.get("tmp", ""), made):
            found.append(Leftover(action.target, f"unfinished overlay file {action.undo['tmp']}"))
        if os.path.islink(action.undo.get("swap", "")):
            found.append(Leftover(device, f"unfinished symlink {action.undo['swap']}"))
        return found


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    from blktx_plugins import _qcow2_external, _qcow2_revert

    types: tuple[type[ActionType], ...] = (InternalCreate, InternalDelete, ExternalCreate)
    for cls in (*types, *_qcow2_revert.TYPES, *_qcow2_external.TYPES):
        register(cls)


@hookimpl
def blktx_cleanup(ctx: RunContext) -> None:
    """A SIGKILLed run cannot remove its storage daemons' folders: remove them now."""
    remove_daemon_folders(ctx.txid)
