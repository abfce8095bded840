"""``qcow2.external-revert`` and ``qcow2.external-delete``: the group snapshots that
``qcow2.external-create`` made, brought back and removed, in the device symlink layout
(docs/backends.md).

A group snapshot made by ``qcow2.external-create`` at time k froze the image the device
pointed to (``undo["old"]``, its identity ``undo["ident"]``): from then on that image
is only a backing file, and QEMU never writes to a backing file, so its content is the
point in time. In the symlink layout the frozen image of group snapshot k is usually the
overlay made by group snapshot k-1.

- **revert**: a new overlay on top of the frozen image (made like an external-create's
  overlay: unnamed until its identity is journaled), then the device re-pointed to it by
  compare and swap. Cancel re-points the device back (only while it still points at this
  run's overlay) and removes the overlay by inode. The image the device pointed to (the
  top of the abandoned branch) is kept and named in the action's output, or with
  ``discard_current`` removed after the commit point when nothing visible depends on it.
- **delete** (finalize): the image whose backing file is the frozen image (found by
  walking the device's chain down) is rebased onto the frozen image's own backing file
  (``qemu-img rebase``, safe mode: the data that differs is copied first and the header
  changed last, so what the guest sees never changes and a killed rebase can simply be
  run again), then the frozen image is unlinked if nothing references it any more and it
  is still the file the group snapshot froze.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, RunContext
from blktx_plugins._fs import (
    DeviceLink,
    fsync_dir,
    identity,
    is_ours,
    private_file,
    publish,
    relative_backing_ok,
    remove_if_ours,
)
from blktx_plugins._image import MAX_CHAIN, Header, check_chain, open_verified, read_image, shown, within
from blktx_plugins._qemu import backing_name, create_overlay, die_with_parent, holder, image_format
from blktx_plugins._runas import RunAs, least_privileged

#: How long a rebase may take: it copies the data the frozen image holds.
REBASE_TIMEOUT = 24 * 3600.0


def ident_text(ident: list[int]) -> str:
    """A file's identity as a parameter: ``"DEV:INO"``."""
    return f"{ident[0]}:{ident[1]}"


def parse_ident(text: str) -> list[int] | None:
    """``[dev, ino]`` from ``"DEV:INO"``; None for ""; ValueError otherwise."""
    if not text:
        return None
    dev, colon, ino = text.partition(":")
    if not colon or not dev.isdigit() or not ino.isdigit():
        raise ValueError(f"identity {text!r} is not DEV:INO (the device and inode numbers of the file)")
    return [int(dev), int(ino)]


def _frozen(action: Action) -> dict[str, Any]:
    """The device and the frozen image (with its identity) of a committed external-create."""
    old, ident = action.undo.get("old"), action.undo.get("ident")
    if not isinstance(old, str) or not (isinstance(ident, list) and len(ident) == 2):
        raise ValueError(
            f"the journal records no identity of the image {action.params['device']} pointed to when this group "
            "snapshot was made (made by an older blktx): its point in time cannot be proven; use its image by hand"
        )
    return {"device": action.params["device"], "image": old, "image_id": ident_text(ident)}


def revert_params(action: Action) -> dict[str, Any]:
    """``qcow2.external-create.revert_params``."""
    return _frozen(action)


def delete_params(action: Action) -> dict[str, Any]:
    """``qcow2.external-create.delete_params``."""
    made = action.undo.get("made")
    overlay_id = ident_text(made) if isinstance(made, list) and len(made) == 2 else ""
    return {**_frozen(action), "overlay": action.params["overlay"], "overlay_id": overlay_id}


def member_exists(action: Action) -> bool:
    """``qcow2.external-create.member_exists``: the group snapshot's point in time is still
    there. That is the frozen image (by its journaled inode), while the overlay the action
    made is still the file at its name (by inode) or gone: merged away by deleting the next
    group snapshot, or the top of a branch a revert discarded; never another file at its
    name. Without the frozen image's identity (an older journal): the overlay alone."""
    overlay, made, ident = action.params["overlay"], action.undo.get("made"), action.undo.get("ident")
    if not isinstance(ident, list):
        return is_ours(overlay, made)
    return is_ours(str(action.undo.get("old", "")), ident) and (is_ours(overlay, made) or not os.path.lexists(overlay))


def _ident_param(action: Action, name: str) -> list[int] | None:
    try:
        return parse_ident(str(action.params.get(name) or ""))
    except ValueError as exc:
        raise Refused(f"{action.type.name} action #{action.index}: {name}: {exc}") from None


@dataclass(frozen=True)
class Layer:
    """One image of a device's chain: its real path, identity, format and header, and
    the name QEMU opens it by through the device (its backing names join that folder)."""

    path: str
    ident: list[int]
    fmt: str
    header: Header | None
    opened: str = ""


def chain_of(device: str, roots: list[str]) -> list[Layer]:
    """The images the device opens, its active image first, each read by blktx (the
    chain confined to ``roots`` first, as every check does). Backing names are joined
    as QEMU joins them: to the folder of the name it opened the image above by (the
    device's own folder first), each layer's ``path`` the real file that gives."""
    opened = os.path.abspath(device)
    path = os.path.realpath(device)
    fmt = image_format(path)[0]
    if fmt == "qcow2":
        check_chain(path, roots, opened_as=opened)
    layers: list[Layer] = []
    while len(layers) < MAX_CHAIN:
        fmt, _, ident = image_format(path) if fmt != "raw" else ("raw", 0, identity(os.stat(path)))
        header = read_image(path) if fmt == "qcow2" else None
        layers.append(Layer(path, ident, fmt, header, opened))
        if header is None or header.backing is None:
            return layers
        opened = os.path.join(os.path.dirname(opened), header.backing)
        path = os.path.realpath(opened)
        fmt = header.backing_format or ""
    raise Refused(f"{device}: its backing chain is longer than {MAX_CHAIN} images")


def users_of(ident: list[int], folders: set[str]) -> list[str]:
    """What in ``folders`` depends on the file ``ident``: a qcow2 image naming it as its
    backing file, a symlink resolving to it. Other folders are not searched."""
    found: list[str] = []
    for folder in sorted({os.path.realpath(f) for f in folders}):  # each folder once, however it was named
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                if _is(path, ident):
                    found.append(f"{path} (a symlink to it)")
                continue
            if not stat.S_ISREG(st.st_mode) or identity(st) == ident:
                continue
            try:
                backing = read_image(path).backing
            except Refused:
                continue  # not a qcow2 image (or not one QEMU would open)
            if backing is None:
                continue
            if _is(os.path.join(folder, backing), ident):
                found.append(path)  # a real path: compared with the chain's
    return found


def _is(path: str, ident: list[int]) -> bool:
    """Whether ``path`` (symlinks followed) is the file ``ident``."""
    try:
        return identity(os.stat(path)) == list(ident)
    except OSError:
        return False


def _in_use(paths: list[str]) -> str | None:
    for path in paths:
        who = holder(path)
        if who:
            return f"{path} is in use by {who}"
    return None


def _overlay(action: Action) -> str:
    """The revert's new overlay: the parameter, else the name check chose."""
    return str(action.params.get("overlay") or action.undo.get("overlay") or "")


class ExternalRevert(DeviceLink, ActionType):
    """Bring a device (symlink layout) back to a group snapshot of qcow2.external-create: a new overlay on its frozen image."""

    name = "qcow2.external-revert"
    # offline images: nothing a quiesce pauses writes to them, so do runs before the window
    do_before_quiesce = True
    params = (
        Param("device", "path", required=True, doc="the stable symlink that users open; it points to the current image"),
        Param(
            "image",
            "path",
            required=True,
            doc="the frozen image: what the device pointed to when the group snapshot was made (never written)",
        ),
        Param("image_id", "str", default="", doc='its identity "DEV:INO" as journaled; another file at that path is refused'),
        Param(
            "overlay",
            "path",
            default="",
            creates=True,
            doc="the new overlay (default: <image without .qcow2>.revert-<txid>.qcow2 next to the image)",
        ),
        Param(
            "discard_current",
            "bool",
            default=False,
            doc="after the commit point remove the image the device pointed to (the abandoned branch's top), "
            "if no image or symlink next to it depends on it",
        ),
        Param("keep_current", "bool", default=False, doc="keep the abandoned branch (the default; blktx revert --keep-current)"),
    )

    def target(self, action: Action) -> str:
        return str(action.params["device"])

    def catalog_member(self, action: Action) -> dict[str, Any] | None:
        """The abandoned branch (unless discarded): its top, the image the device pointed
        to, as the point in time of a qcow2.external-create member, to revert to or delete."""
        current, current_id, made = action.undo.get("current"), action.undo.get("current_id"), action.undo.get("made")
        if action.params["discard_current"] or not isinstance(current_id, list) or current == action.params["image"]:
            return None
        return {
            "index": action.index,
            "type": "qcow2.external-create",
            "target": action.target,
            "params": {"device": action.params["device"], "overlay": action.undo.get("overlay", ""), "reuse": False},
            "identity": {"old": current, "ident": current_id, "made": made},
        }

    def check(self, action: Action, ctx: RunContext) -> None:
        device, frozen = action.params["device"], action.params["image"]
        if action.params["discard_current"] and action.params["keep_current"]:
            raise Refused("discard_current and keep_current contradict each other", hint="give one of them")
        if not os.path.islink(device):
            raise Refused(f"device {device} is not a symlink", hint="qcow2.external-revert reverts the symlink layout only")
        want = _ident_param(action, "image_id")
        if not os.path.lexists(frozen):
            raise Refused(f"the group snapshot's image {frozen} is gone: its point in time is lost")
        fmt, size, ident = image_format(frozen)
        if want and ident != want:
            raise Refused(
                f"{frozen} is not the image the group snapshot froze (inode {ident[1]}, not {want[1]}): "
                "it was replaced; left alone"
            )
        if fmt == "qcow2":
            check_chain(frozen, ctx.options.roots)
        current = os.path.realpath(device)
        if os.path.lexists(device) and not within(current, ctx.options.roots):
            raise Refused(
                f"device {device} points outside the roots its group snapshot was made under (to {current}); left alone",
                hint="re-point it at its image, or give the image's folder with --root when the group snapshot is made",
            )
        current_id = identity(os.stat(current)) if os.path.exists(current) else None
        who = holder(current) if current_id else None
        if who:
            raise Refused(f"{device}'s image {current} is in use by {who}", hint="shut the VM down first")
        overlay = action.params["overlay"]
        if not overlay:
            stem = os.path.basename(frozen)
            stem = stem[: -len(".qcow2")] if stem.endswith(".qcow2") and len(stem) > 6 else stem
            overlay = os.path.join(os.path.dirname(frozen), f"{stem}.revert-{ctx.txid}.qcow2")
            if not within(overlay, ctx.options.roots):
                raise Refused(f"the new overlay {overlay} would lie outside the allowed roots", hint="give overlay = ...")
        if os.path.lexists(overlay):
            raise Refused(f"overlay {overlay} already exists", hint="choose a new name")
        if not os.access(os.path.dirname(overlay), os.W_OK):
            raise Refused(f"cannot create files in {os.path.dirname(overlay)}")
        token = f"blktx-{ctx.txid}-{os.urandom(4).hex()}"
        action.undo.update(
            {
                "link": os.readlink(device),
                "current": current,
                "current_id": current_id,
                "frozen_id": ident,
                "format": fmt,
                "size": size,
                "overlay": overlay,
                "tmp": f"{overlay}.{token}",
                "swap": f"{device}.{token}",
            }
        )

    def do(self, action: Action, ctx: RunContext) -> None:
        overlay, frozen = _overlay(action), action.params["image"]
        private = private_file(overlay, action.undo["tmp"])
        try:
            # Durable before the overlay can appear under its name: cancel removes the
            # file at that name only if it is this very inode.
            action.undo["made"] = private.ident
            ctx.remember([action])
            # The overlay names the frozen image by path: it must still be that file.
            os.close(open_verified(frozen, action.undo["frozen_id"]))
            create_overlay(private, overlay, frozen, action.undo["format"], action.undo["size"], self._relative_backing(action))
            try:
                publish(private, overlay)
            except FileExistsError:
                raise ActionFailed(f"overlay {overlay} appeared after the check; it was left alone") from None
        finally:
            private.close()

    def _overlay_of(self, action: Action) -> str:
        return _overlay(action)

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        device, current = action.params["device"], action.undo["current"]
        if ctx.hook is not None and ctx.hook.blktx_switch_active_image(
            ctx=ctx, action=action, device=device, old=current, new=_overlay(action)
        ):
            action.undo["hooked"] = True
            return
        text = os.readlink(device)
        if text == self._link_text(action):
            return  # already switched (a retry)
        if text != action.undo["link"]:
            raise ActionFailed(
                f"device {device} was re-pointed after the check (it says {text!r}, not {action.undo['link']!r}); left alone"
            )
        who = holder(current) if action.undo.get("current_id") else None
        if who:
            raise ActionFailed(f"{device}'s image {current} came into use by {who} after the check; left alone")
        self._swap(action, action.undo["link"], self._link_text(action))

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if "link" not in action.undo:
            return  # never checked: nothing was done
        device, overlay = action.params["device"], _overlay(action)
        switched = ctx.hook is not None and ctx.hook.blktx_switch_active_image(
            ctx=ctx, action=action, device=device, old=overlay, new=action.undo["current"]
        )
        self._switch_back(action, hooked=switched)
        made = action.undo.get("made")
        remove_if_ours(overlay, made)
        remove_if_ours(action.undo.get("tmp", ""), made)

    def finish(self, action: Action, ctx: RunContext) -> None:
        """After the commit point: name the abandoned branch, or remove its top (discard_current)."""
        top = str(action.undo.get("current"))
        now = f"{action.params['device']} opens {_overlay(action)} (on {action.params['image']})"
        if top == action.params["image"]:
            action.output = f"{now}; nothing was abandoned (the device pointed to the frozen image)"
            return
        if not action.params["discard_current"]:
            action.output = f"{now}; the abandoned branch is kept: {top}"
            return
        why = self._keep(action, ctx)
        if why is None:
            os.unlink(top)
            fsync_dir(os.path.dirname(top))
            why = "removed"
        action.output = f"{now}; the abandoned branch {top}: {why}"

    def _keep(self, action: Action, ctx: RunContext) -> str | None:
        """Why the top of the abandoned branch must stay, or None when it may go."""
        top, top_id = str(action.undo.get("current")), action.undo.get("current_id")
        if action.undo.get("hooked"):
            return "kept (a blktx_switch_active_image hook switched the active image, not the symlink)"
        if not isinstance(top_id, list) or not is_ours(top, top_id):
            return "gone already, or replaced by another file (left alone)"
        try:
            chain = chain_of(action.params["device"], ctx.options.roots)
            header = read_image(top) if image_format(top)[0] == "qcow2" else None
        except Refused as exc:
            return f"kept ({exc})"
        if any(layer.ident == top_id for layer in chain):
            return "kept (the reverted device's chain uses it)"
        if header is not None and header.snapshots:
            return f"kept (it holds {len(header.snapshots)} internal snapshots: other points in time)"
        users = users_of(top_id, {os.path.dirname(top), os.path.dirname(str(action.params["device"]))})
        if users:
            return f"kept ({', '.join(users)} depends on it)"
        who = holder(top)
        return f"kept (in use by {who})" if who else None

    def leftovers(self, action: Action) -> list[Leftover]:
        found = []
        overlay, device, made = _overlay(action), action.params["device"], action.undo.get("made")
        if self._points_to_ours(action):
            found.append(Leftover(action.target, f"device symlink points to the revert's overlay {overlay}"))
        if is_ours(overlay, made):
            found.append(Leftover(action.target, f"overlay file {overlay}"))
        if is_ours(action.undo.get("tmp", ""), made):
            found.append(Leftover(action.target, f"unfinished overlay file {action.undo['tmp']}"))
        if os.path.islink(action.undo.get("swap", "")):
            found.append(Leftover(device, f"unfinished symlink {action.undo['swap']}"))
        return found


def _names_opened(layers: list[Layer], below: Layer | None) -> list[str]:
    """The names ``qemu-img rebase`` of ``layers[0]`` onto ``below`` opens: each backing
    file joined, as QEMU joins it, to the folder of the name it opened the image above
    by (not its real path: a symlink on the way is followed when QEMU opens it), along
    the old chain and along the new one from the name :func:`backing_name` gives."""
    if not layers:
        return []
    names = [layers[0].path]
    for layer in layers[:-1]:
        if layer.header is None or layer.header.backing is None:
            break
        names.append(os.path.join(os.path.dirname(names[-1]), layer.header.backing))
    if below is not None:
        name = os.path.join(os.path.dirname(layers[0].path), _new_backing(layers[0], below))
        names.append(name)
        for layer in layers[next((i for i, x in enumerate(layers) if x is below), len(layers)) : -1]:
            if layer.header is None or layer.header.backing is None:
                break
            name = os.path.join(os.path.dirname(name), layer.header.backing)
            names.append(name)
    return names


def _new_backing(child: Layer, below: Layer) -> str:
    """The backing name the rebase writes into ``child``: relative to its real folder
    (:func:`backing_name`) only when a VM, opening ``child`` through the device, joins it
    to that very folder; else ``below``'s absolute path (QEMU joins a relative name to the
    folder of the name it opened ``child`` by, the device's own for its active image)."""
    if relative_backing_ok(child.path, child.opened or child.path):
        return backing_name(child.path, below.path)
    return below.path


def _rebase(child: Layer, below: Layer | None, run_as: RunAs | None) -> None:
    """``qemu-img rebase`` (safe mode) of ``child`` onto ``below`` (None: no backing file).

    QEMU copies every cluster the old and new backing files disagree on into ``child``,
    then changes the header last; ``-t writethrough`` makes each copied cluster (data and
    L2 entry) durable before the next, so neither a kill nor a power loss can leave the
    new header over clusters that are not there. Killed with blktx.

    QEMU opens the chain by the names in its headers: ``run_as`` (see
    :mod:`blktx_plugins._runas`) is the one user who could change them, so a header
    rewritten after the check makes it read only what that user can read."""
    os.close(open_verified(child.path, child.ident))  # still the file the check read
    target = ["-b", ""] if below is None else ["-b", _new_backing(child, below), "-F", below.fmt]
    argv = ["qemu-img", "rebase", "-q", "-t", "writethrough", "-f", "qcow2", *target, child.path]
    who: dict[str, Any] = {} if run_as is None else {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=REBASE_TIMEOUT,
        check=False,
        preexec_fn=die_with_parent(os.getpid()),
        cwd="/",
        **who,
    )
    if out.returncode != 0:
        as_whom = f" (run as {run_as})" if run_as else ""
        raise ActionFailed(f"qemu-img rebase of {child.path}{as_whom}: {(out.stderr or out.stdout).strip()}")


class ExternalDelete(ActionType):
    """Delete a group snapshot of qcow2.external-create: its frozen image merged into the image above it (finalize)."""

    name = "qcow2.external-delete"
    finalize = True
    shares_target = True
    params = (
        Param("device", "path", required=True, doc="the stable symlink that users open"),
        Param("image", "path", required=True, doc="the frozen image whose point in time is deleted"),
        Param("image_id", "str", default="", doc='its identity "DEV:INO" as journaled; another file at that path is refused'),
        Param("overlay", "path", default="", doc="the overlay the group snapshot made (named in messages)"),
        Param("overlay_id", "str", default="", doc='its identity "DEV:INO"'),
    )

    def target(self, action: Action) -> str:
        return str(action.params["device"])

    def _judge(self, action: Action, roots: list[str]) -> tuple[Layer | None, Layer | None, RunAs | None]:
        """The image above the frozen one in the device's chain, the one below it (None,
        None: it is in no chain, and nothing next to it depends on it) and whom the rebase
        runs as. Refused when deleting it would change what the device or anything else
        sees, or when the rebase could not run as the one user who can change the chain."""
        device, frozen, ident = action.params["device"], action.params["image"], action.undo["ident"]
        layers = chain_of(device, roots)
        at = next((i for i, layer in enumerate(layers) if layer.ident == ident), None)
        if at == 0:
            raise Refused(f"{frozen} is the active image of {device}: deleting it would change what the guest sees")
        child = layers[at - 1] if at else None
        folders = {os.path.dirname(frozen), os.path.dirname(os.path.abspath(device))}
        if child is not None:
            folders.add(os.path.dirname(child.path))
        others = [u for u in users_of(ident, folders) if child is None or u != child.path]
        if others:
            if child is not None:
                raise Refused(
                    f"{frozen} is the backing file of {child.path} and of {', '.join(others)}: a branch (a revert "
                    "or another chain) depends on this point in time",
                    hint="revert away from the branch and remove it, or keep this group snapshot",
                )
            mine = is_ours(action.params["overlay"], parse_ident(action.params["overlay_id"]))
            raise Refused(
                f"{frozen} is not in the chain of {device}, and {', '.join(others)} depends on it"
                + (f" (the group snapshot's overlay {action.params['overlay']}, on a branch the device left)" if mine else ""),
                hint="remove the abandoned branch first, if nothing needs it",
            )
        # the images from the device's active one down to the frozen one (QEMU opens them all)
        who = _in_use([layer.path for layer in layers[: at + 1]] if at is not None else [frozen])
        if who:
            raise Refused(who, hint="shut the VM down first")
        if child is None:
            return None, None, None
        for layer in layers[at - 1 :] if at is not None else []:  # qemu-img would open each one by name
            if layer.header is not None and layer.header.data_file is not None:
                raise Refused(f"{layer.path} keeps its data in an external data file: blktx does not rebase such a chain")
        if not os.access(child.path, os.W_OK):
            raise Refused(f"{child.path} is not writable")
        below = layers[at + 1] if at is not None and at + 1 < len(layers) else None
        opened = [layer.path for layer in layers[at - 1 :]] if at is not None else []  # what qemu-img opens by name
        # ... by the names QEMU joins from the headers (symlinks included), not their real paths
        run_as = least_privileged([*opened, *_names_opened(layers[at - 1 :] if at is not None else [], below)])
        problem = run_as.refusal(opened[1:], opened[:1]) if run_as else None
        if problem:
            raise Refused(
                f"the merge would run as the one user who can change its images, and {problem}",
                hint="give the chain's images one owner who can read them all, and its folders to root",
            )
        return child, below, run_as

    def check(self, action: Action, ctx: RunContext) -> None:
        device, frozen = action.params["device"], action.params["image"]
        if not os.path.islink(device):
            raise Refused(f"device {device} is not a symlink", hint="qcow2.external-delete acts on the symlink layout only")
        want = _ident_param(action, "image_id")
        _ident_param(action, "overlay_id")
        if not os.path.lexists(frozen):
            raise Refused(f"the group snapshot's image {frozen} is gone", hint="blktx delete --missing-ok skips it")
        if os.path.islink(frozen) or not within(os.path.realpath(frozen), ctx.options.roots):
            raise Refused(f"{frozen} is a symlink or lies outside the roots its group snapshot was made under; left alone")
        fmt, _, ident = image_format(frozen)
        if want and ident != want:
            raise Refused(f"{frozen} is not the image the group snapshot froze (inode {ident[1]}, not {want[1]}); left alone")
        header = read_image(frozen) if fmt == "qcow2" else None
        if header is not None and header.snapshots:
            names = ", ".join(shown(s.name) for s in header.snapshots)
            raise Refused(f"{frozen} holds internal snapshots ({names}): deleting the file would destroy those points in time")
        if header is not None and header.data_file is not None:
            raise Refused(f"{frozen} keeps its data in an external data file: blktx does not delete such an image")
        if not os.access(os.path.dirname(frozen), os.W_OK):
            raise Refused(f"cannot remove files in {os.path.dirname(frozen)}")
        claimed: dict[tuple[int, ...], int] = ctx.resource("qcow2.external-delete.claimed", dict)
        if tuple(ident) in claimed:
            raise Refused(f"conflicts with action #{claimed[tuple(ident)]}: both delete {frozen}")
        claimed[tuple(ident)] = action.index
        action.undo["ident"] = ident
        child, _, _ = self._judge(action, ctx.options.roots)
        action.undo["above"] = [child.path, child.ident] if child else None

    def do(self, action: Action, ctx: RunContext) -> None:
        frozen, ident = action.params["image"], action.undo["ident"]
        if not is_ours(frozen, ident):
            return  # gone already (a retry): done; never another file at that name
        try:
            # Found again now: another delete of this transaction may have merged the
            # image above, or a killed run may have rebased it already.
            child, below, run_as = self._judge(action, ctx.options.roots)
        except Refused as exc:
            raise ActionFailed(f"{exc}; left alone") from None
        if child is not None:
            action.undo["rebasing"] = [child.path, child.ident]
            ctx.remember([action])
            _rebase(child, below, run_as)
            backing = read_image(child.path).backing
            if backing is not None and _is(os.path.join(os.path.dirname(child.path), backing), ident):
                raise ActionFailed(f"{child.path} still names {frozen} as its backing file after the rebase; left alone")
        if is_ours(frozen, ident):
            os.unlink(frozen)
            fsync_dir(os.path.dirname(frozen))
        action.output = f"{frozen} removed" + (f", merged into {child.path}" if child is not None else "")


TYPES: tuple[type[ActionType], ...] = (ExternalRevert, ExternalDelete)
