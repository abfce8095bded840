"""Owning files by identity: make a file privately, record what it is, then publish it.

The contract forbids a cancel to delete anything the transaction did not provably
make, and "made" is proven by an identity recorded before the object got the name
the spec asked for, never by its name or shape. These helpers give the plugins
the pieces: a private file (unnamed, ``O_TMPFILE``, or under a private name on a
filesystem without it), its identity ``[st_dev, st_ino]``, publishing with
``link(2)`` (which fails rather than replace), ``rename`` without replacing, and
removal only of the recorded identity.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blktx import ActionFailed

if TYPE_CHECKING:
    from blktx import Action

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@dataclass
class Private:
    """A file made for one action, not yet under its public name.

    ``tmp`` is None for an unnamed file (``O_TMPFILE``): it vanishes with the
    process if blktx dies before publishing it, so nothing can be left behind.
    """

    fd: int
    ident: list[int]
    tmp: str | None

    @property
    def path(self) -> str:
        """A name other processes can open it by (a child given the fd)."""
        return f"/proc/self/fd/{self.fd}" if self.tmp is None else self.tmp

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino]


def private_file(public: str, tmp: str, mode: int = 0o644) -> Private:
    """A new empty file in ``public``'s folder that no name points to yet.

    Falls back to ``tmp`` (a name only this action uses, created exclusively)
    where the filesystem has no ``O_TMPFILE`` (NFS, older overlayfs).
    """
    folder = os.path.dirname(public) or "."
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, mode)
        name = None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        name = tmp
    return Private(fd, identity(os.fstat(fd)), name)


def publish(private: Private, public: str) -> None:
    """Give ``private`` its public name; ``FileExistsError`` if anything is there.

    ``link(2)`` never replaces: a file that appeared at ``public`` after the check
    is left alone. An unnamed file is linked through its ``/proc`` magic link,
    which ``linkat(AT_SYMLINK_FOLLOW)`` follows (``os.link`` uses ``linkat`` when
    given a ``src_dir_fd``).
    """
    if private.tmp is None:
        dfd = os.open(os.path.dirname(public) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(private.path, public, src_dir_fd=dfd, follow_symlinks=True)
        finally:
            os.close(dfd)
    else:
        os.link(private.tmp, public)
        os.unlink(private.tmp)


def is_ours(path: str, ident: list[int] | None) -> bool:
    """Whether ``path`` is the regular file recorded as ``ident`` (without following a symlink)."""
    if not ident or not path:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and identity(st) == list(ident)


def remove_if_ours(path: str, ident: list[int] | None) -> bool:
    """Unlink ``path`` only when it is the recorded file; True when it did."""
    if is_ours(path, ident):
        os.unlink(path)
        return True
    return False


def rename_noreplace(src: str, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``: unlike ``rename(2)``, never replaces ``dst``
    (an empty folder included); ``FileExistsError`` if anything is there."""
    import ctypes  # here: every start of blktx would pay for it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst) if err != errno.EEXIST else FileExistsError(err, "exists", dst)


def fsync_dir(path: str) -> None:
    dfd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def swap_link(device: str, swap: str, expected: str, text: str) -> None:
    """Compare and swap the symlink ``device``: only while it says ``expected``, make it
    say ``text``, atomically and durably (a new symlink under the private name ``swap``,
    ``rename(2)`` over the device; ``symlink(2)`` fails rather than replace whatever has
    that private name). A symlink a killed swap left at ``swap`` is removed first."""
    if os.readlink(device) != expected:
        return
    drop_link(swap, (expected, text))
    os.symlink(text, swap)
    os.replace(swap, device)
    fsync_dir(os.path.dirname(device))


def drop_link(swap: str, ours: tuple[str, ...]) -> None:
    """Remove what a killed swap left under the private name ``swap``: only a symlink
    saying one of ``ours`` (the two things that swap writes), never anything else."""
    if swap and os.path.islink(swap) and os.readlink(swap) in ours:
        os.unlink(swap)


def relative_backing_ok(image: str, opened: str) -> bool:
    """Whether ``image`` may name its backing file relative to its own folder. QEMU joins
    a relative backing name to the folder of the *name* it opened the image by
    (``opened``: a device symlink, say), not the image's own: only when the two are one
    folder do a VM and ``qemu-img info IMAGE`` find the same file; otherwise the name
    must be absolute."""
    real = os.path.realpath(os.path.dirname(os.path.abspath(image)))
    return os.path.realpath(os.path.dirname(os.path.abspath(opened))) == real


class DeviceLink:
    """The device symlink of a type that switches it to an overlay it made
    (``qcow2.external-create``, ``qcow2.external-revert``, ``qmp.external-create``):
    ``params["device"]``, what it said at check (``undo["link"]``), the private name
    of a swap (``undo["swap"]``) and the overlay's identity (``undo["made"]``)."""

    def _overlay_of(self, action: Action) -> str:
        return str(action.params["overlay"])

    def _relative_backing(self, action: Action) -> bool:
        """Whether the overlay may name its backing file relative to its own folder: QEMU
        opens it through the device (:func:`relative_backing_ok`)."""
        return relative_backing_ok(self._overlay_of(action), str(action.params["device"]))

    def _link_text(self, action: Action) -> str:
        """What the switch makes the device symlink say: the overlay, relative to its folder."""
        return os.path.relpath(self._overlay_of(action), os.path.dirname(str(action.params["device"])))

    def _points_to_ours(self, action: Action) -> bool:
        """Whether the device still says what the switch wrote and leads to this run's
        overlay (by its identity; an overlay that was there before, by its text)."""
        device = action.params["device"]
        try:
            if os.readlink(device) != self._link_text(action):
                return False
            if action.undo.get("preexisting"):
                return True
            return identity(os.stat(device)) == action.undo.get("made")
        except OSError:
            return False

    def _swap(self, action: Action, expected: str, text: str) -> None:
        """Compare and swap the device symlink (:func:`swap_link`)."""
        swap_link(action.params["device"], action.undo["swap"], expected, text)

    def _drop_swap(self, action: Action) -> None:
        drop_link(action.undo.get("swap", ""), (self._link_text(action), action.undo["link"]))

    def _switch(self, action: Action) -> None:
        """Re-point the device at the overlay: a retry finds it done; a device re-pointed
        by someone else since the check is refused and left alone."""
        device = action.params["device"]
        if os.readlink(device) == self._link_text(action):
            return  # already switched (a retry)
        if os.readlink(device) != action.undo["link"]:
            raise ActionFailed(
                f"device {device} was re-pointed after the check (it says {os.readlink(device)!r}, "
                f"not {action.undo['link']!r}); it was left alone"
            )
        self._swap(action, action.undo["link"], self._link_text(action))

    def _switch_back(self, action: Action, hooked: bool = False) -> None:
        """Cancel's part: the device back to what it said at check, only while it still
        points at this run's overlay (unless a hook switched it back), then whatever a
        killed swap left under the private name."""
        if not hooked and self._points_to_ours(action):
            self._swap(action, self._link_text(action), action.undo["link"])
        self._drop_swap(action)
