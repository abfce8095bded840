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
