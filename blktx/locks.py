"""Target locks across processes: a kernel lock while a run lives, a durable claim
while its transaction is unfinished. Both live in one well-known folder, whichever
journal a run uses.

Each run (and each ``blktx recover`` working on a transaction) writes a *claim*
file ``claims/<txid>.json`` naming its transaction, its journal and the lock keys
of every target (:func:`blktx.identity.lock_keys`), fsyncs it, and holds an
``fcntl`` open-file-description (OFD) lock on it for as long as the process lives.

- The kernel lock is the liveness test: the kernel drops it when the process dies,
  in whatever PID namespace it ran. No pids, no /proc start times.
- The claim is the durable part: it stays after a run that ends needing recovery
  (or is killed), so its targets stay refused until ``blktx recover`` finishes the
  transaction and removes the claim. A claim whose process is gone and whose journal
  says the transaction ended (or never began: it died during its checks) is stale
  and removed by the next run that meets it.
- Claims are read and written under a short global lock (``mutex``), so two runs
  can neither both take a target nor deadlock.

The folder is ``$BLKTX_LOCK_DIR``, else ``/var/lib/blktx/locks`` for root (on
disk: a claim must outlive a power loss), else ``$XDG_STATE_HOME/blktx/locks``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from blktx.errors import BlktxError, InvalidTransaction, Problem
from blktx.identity import lock_owners, untrusted_folders
from blktx.states import TX_FINAL, TxState

_OFD_WRLCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW = 36, 37, 38


def default_dir() -> str:
    if os.environ.get("BLKTX_LOCK_DIR"):
        return os.path.abspath(os.environ["BLKTX_LOCK_DIR"])
    if os.geteuid() == 0:
        return "/var/lib/blktx/locks"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "blktx", "locks")


def _try_lock(fd: int, wait: bool = False) -> bool:
    try:
        fcntl.fcntl(fd, _F_OFD_SETLKW if wait else _F_OFD_SETLK, _OFD_WRLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _held_by_other(fd: int) -> bool:
    """Whether another open file description holds a lock on the file (it lives)."""
    got = fcntl.fcntl(fd, _F_OFD_GETLK, _OFD_WRLCK)
    return bool(struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK)


@dataclass
class Claim:
    """One transaction's hold on its targets: the claim file and, while held, its lock."""

    txid: str
    journal: str
    keys: list[str]
    owners: dict[str, str] = field(default_factory=dict)  # lock key -> the target it came from
    path: str = ""
    fd: int | None = None
    #: The claim's fsyncs (file, then folder) running beside the checks and BEGIN.
    _syncing: threading.Thread | None = field(default=None, repr=False)
    _sync_error: list[OSError] = field(default_factory=list, repr=False)

    def durable(self) -> None:
        """Wait until the claim is on disk; raise the ``OSError`` its fsync met.

        A claim is exclusive from the moment it is written (the kernel lock and the
        file other runs read); its durability matters only once something is touched,
        since it is what keeps the targets claimed after a power loss: the run waits
        for it before its first intent (``Transaction._forward``)."""
        if self._syncing is not None:
            self._syncing.join()
            self._syncing = None
        if self._sync_error:
            raise self._sync_error[0]

    def to_json(self) -> dict[str, Any]:
        return {"txid": self.txid, "journal": self.journal, "keys": self.keys, "pid": os.getpid(), "since": time.time()}


def journal_state(journal: str, txid: str) -> TxState | str | None:
    """The transaction's state in ``journal``; None when it has no such row; a string
    saying why when the journal cannot be read."""
    import sqlite3  # only when a claim is met: not on every start

    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute("SELECT status FROM tx WHERE txid = ?", (txid,)).fetchone()
    except sqlite3.Error as exc:
        return f"its journal {journal} cannot be read ({exc})"
    if row is None:
        return None
    try:
        return TxState(row[0])
    except ValueError:
        return f"its journal {journal} says {row[0]!r}"


class Locker:
    """Takes and releases claims in one folder. Thread-safe per claim; one per process is enough."""

    def __init__(self, directory: str | None = None, *, wait: float = 0.0) -> None:
        self.dir = directory or default_dir()
        self.wait = wait
        early = untrusted_folders(os.path.join(self.dir, "claims", "x"))
        if early and not os.path.isdir(os.path.join(self.dir, "claims")):  # never make folders through it
            raise BlktxError(
                f"the lock folder {self.dir} would be made where others can write ({early}); give another with $BLKTX_LOCK_DIR"
            )
        try:
            os.makedirs(os.path.join(self.dir, "claims"), mode=0o700, exist_ok=True)
            self._dirfd = os.open(os.path.join(self.dir, "claims"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            st = os.fstat(self._dirfd)
        except OSError as exc:
            raise BlktxError(f"cannot use the lock folder {self.dir}: {exc}; give another with $BLKTX_LOCK_DIR") from None
        why = untrusted_folders(os.path.join(self.dir, "claims", "x"))
        if st.st_uid != os.geteuid() or why:
            os.close(self._dirfd)
            raise BlktxError(
                f"the lock folder {self.dir}/claims is not owned by you, or others can write it "
                f"({why or 'owner'}); fix its owner and mode (0700), or give another with $BLKTX_LOCK_DIR"
            )

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        fd = os.open("mutex", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dirfd)
        try:
            _try_lock(fd, wait=True)
            yield
        finally:
            os.close(fd)  # closing the description drops its OFD lock

    # -- reading ------------------------------------------------------------------

    def _claims(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        for name in os.listdir(self._dirfd):
            if not name.endswith(".json"):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
            except FileNotFoundError:
                continue
            with os.fdopen(fd, "rb") as fh:
                try:
                    data = json.loads(fh.read(64 << 20))
                except ValueError:
                    data = None
            yield name, data if isinstance(data, dict) else None

    def live(self, txid: str) -> bool:
        """Whether a process holds ``txid``'s claim right now (a run or a recover)."""
        try:
            fd = os.open(_name(txid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
        except FileNotFoundError:
            return False
        try:
            return _held_by_other(fd)
        finally:
            os.close(fd)

    def claims(self) -> list[dict[str, Any]]:
        """Every claim in the folder, with ``live`` saying whether its process holds it."""
        out = []
        for name, data in self._claims():
            item = dict(data or {"txid": name[:-5], "unreadable": True})
            item["live"] = self.live(str(item.get("txid", name[:-5])))
            out.append(item)
        return out

    # -- taking and releasing ---------------------------------------------------------

    def acquire(self, txid: str, journal: str, targets: Sequence[str], stop: Callable[[], bool] = lambda: False) -> Claim:
        """Claim every target of ``txid`` (by its lock keys), or raise
        :class:`InvalidTransaction` naming each holder. A key held by a live run is
        waited for up to ``wait`` seconds; a key claimed by an unfinished
        transaction whose process is gone is refused at once."""
        owners = lock_owners(sorted(set(targets)))
        claim = Claim(txid, os.path.abspath(journal), sorted(owners), owners)
        deadline = time.monotonic() + self.wait
        while True:
            with self._mutex():
                problems, dead = self._conflicts(claim)
                if not problems:
                    self._write(claim, later=True)
                    return claim
            if dead or time.monotonic() >= deadline or stop():  # an interrupt ends the wait too
                raise InvalidTransaction(problems)
            time.sleep(0.05)

    def _conflicts(self, claim: Claim) -> tuple[list[Problem], bool]:
        wanted = set(claim.keys)
        by_key: dict[str, tuple[str, str, str | None]] = {}
        dead = False
        for name, data in self._claims():
            if data is None:
                other, keys, journal = name[:-5], wanted, "?"
                why: str | None = f"its claim file {self.dir}/claims/{name} is unreadable"
            else:
                other, keys, journal = str(data.get("txid")), set(data.get("keys") or ()), str(data.get("journal"))
                why = None
            if other == claim.txid:
                continue
            if self.live(other):
                holder = f"running transaction {other} (pid {data.get('pid') if data else '?'})"
                for key in wanted & keys:
                    by_key.setdefault(key, (holder, "wait for it, or give --wait SECONDS", None))
                continue
            if data is None and self._never_durable(name):  # its run touched nothing: see _never_durable
                self._unlink(name)
                continue
            if why is None and journal in ("", "None"):  # a run without a journal: nothing to recover
                self._unlink(name)
                continue
            if why is None:
                state = journal_state(journal, other)
                if _over(state):
                    self._unlink(name)
                    continue
                why = state if isinstance(state, str) and not isinstance(state, TxState) else None
            hint = f"run `blktx recover --journal {journal}`"
            if why is not None:
                hint += f"; if that journal is lost, check the targets by hand, then `blktx recover --forget {other}`"
            for key in wanted & keys:
                dead = True
                by_key[key] = (f"unfinished transaction {other}", hint, why)
        problems: list[Problem] = []
        seen: set[tuple[str, str]] = set()
        for key in sorted(by_key):
            holder, hint, why = by_key[key]
            target = claim.owners.get(key, key)
            if (holder, target) in seen:
                continue
            seen.add((holder, target))
            message = f"target is held by {holder}" + (f": {why}" if why else "")
            problems.append(Problem(message, target=target, hint=hint))
        return problems, dead

    def _never_durable(self, name: str) -> bool:
        """Whether the claim file ``name`` (not held by a live process) is empty or all
        NUL bytes: what a power loss leaves of a claim whose rename reached the disk
        before its data did (its fsyncs run in a thread after the rename, and another
        fsync on the filesystem, BEGIN's, or the periodic commit can make the rename
        durable first). Its run never passed :meth:`Claim.durable`, which comes before
        its first intent: it touched nothing, and the claim is stale. Any other
        unreadable claim still refuses its targets."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
        except FileNotFoundError:
            return False
        with os.fdopen(fd, "rb") as fh:
            head = fh.read(64 << 10)
            return not head.strip(b"\0") and not fh.read(1)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dirfd)

    def sweep(self) -> int:
        """Remove every stale claim: no live process holds it and its journal says the
        transaction ended (a run killed between its last journal write and removing
        its claim) or never began. Returns how many."""
        removed = 0
        with self._mutex():
            for name, data in self._claims():
                if data is None and not self.live(name[:-5]) and self._never_durable(name):
                    self._unlink(name)
                    removed += 1
                    continue
                if data is None or self.live(str(data.get("txid"))):
                    continue
                if _over(journal_state(str(data.get("journal")), str(data.get("txid")))):
                    self._unlink(name)
                    removed += 1
        return removed

    def _write(self, claim: Claim, *, later: bool = False) -> None:
        """Write the claim whole, then rename it into place (under the mutex): a claim
        file is complete or absent, whatever kills the process or fills the disk.
        ``later``: the fsyncs run in a thread; :meth:`Claim.durable` waits for them. Until
        then a power loss may leave the renamed file empty (:meth:`_never_durable`)."""
        name = _name(claim.txid)
        tmp = f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dirfd)
        try:
            if not _try_lock(fd):  # the lock goes with the file through the rename
                raise BlktxError(f"the claim of {claim.txid} is held by another process")
            data = json.dumps(claim.to_json()).encode()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write of the claim {name}")
            if not later:
                os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
            if not later:
                os.fsync(self._dirfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dirfd)
            os.close(fd)
            raise
        claim.path, claim.fd = os.path.join(self.dir, "claims", name), fd
        if later:
            dirfd = self._dirfd

            def sync() -> None:
                try:  # the file's data before the folder's entry: both before the first intent
                    os.fsync(fd)
                    os.fsync(dirfd)
                except OSError as exc:
                    claim._sync_error.append(exc)

            claim._syncing = threading.Thread(target=sync, name=f"blktx-claim-{claim.txid}", daemon=True)
            claim._syncing.start()

    def take_over(self, txid: str, journal: str, targets: Sequence[str]) -> Claim | None:
        """For ``blktx recover``: hold the claim of a transaction whose run is gone
        (writing it anew if it was lost), or None when a live process holds it."""
        with self._mutex():
            if self.live(txid):
                return None
            owners = lock_owners(sorted(set(targets)))
            claim = Claim(txid, os.path.abspath(journal), sorted(owners), owners)
            self._write(claim)
            return claim

    def forget_claim(self, txid: str) -> None:
        """Remove a dead run's claim (``blktx recover --forget``: its journal is lost)."""
        with self._mutex():
            if not self.live(txid):
                self._unlink(_name(txid))
                os.fsync(self._dirfd)

    def release(self, claim: Claim, *, finished: bool) -> None:
        """Drop the kernel lock; remove the claim only when the transaction ``finished``
        (DONE, ABORTED, INVALID): an unfinished one keeps its targets claimed."""
        if claim.fd is None:
            return
        with contextlib.suppress(OSError):  # its descriptor is closed below: no fsync may run on
            claim.durable()
        if finished:
            # Not fsynced: the journal's final state is durable already, so a claim that
            # a power loss brings back is stale by that state, and the next run sweeps it.
            with self._mutex():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_name(claim.txid), dir_fd=self._dirfd)
        os.close(claim.fd)
        claim.fd = None

    def close(self) -> None:
        os.close(self._dirfd)


def _over(state: TxState | str | None) -> bool:
    """Whether a dead run's claim is stale: its transaction ended, or never began
    (it died during its checks: nothing was touched)."""
    return state is None or (isinstance(state, TxState) and state in TX_FINAL)


def _name(txid: str) -> str:
    if not txid or "/" in txid or txid.startswith("."):
        raise BlktxError(f"not a transaction id: {txid!r}")
    return txid + ".json"


class NullLocker:
    """Locks nothing: for library use without a journal."""

    def acquire(self, txid: str, journal: str, targets: Sequence[str], stop: Callable[[], bool] = lambda: False) -> Claim:
        return Claim(txid, journal, [])

    def release(self, claim: Claim, *, finished: bool) -> None:
        return None
