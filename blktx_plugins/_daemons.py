"""Several ``qemu-storage-daemon`` at once, each with one batch of the images.

QEMU makes an internal snapshot with about six ``fdatasync`` calls, one after
another in the daemon's one thread; offline images have no writer, and blktx's
journal and cancel make the whole group all or none across daemons, so the images
are split into batches, one daemon each, all working at the same time (their QMP
commands go out together from the shared loop).

How many: ``jobs`` when it is above 1, else :func:`default_daemons`; never more
than the images allow (:data:`MIN_PER_DAEMON` each). How large: each daemon holds
two descriptors per image (blktx's, passed, and QEMU's own) and its soft limit is
raised to the hard one (:func:`~blktx_plugins._qemu.child_nofile`); blktx holds a
batch's descriptors while it spawns that daemon, one spawn at a time. So a batch
is at most what both limits leave (:func:`batch_limit`), and a group larger than
``daemons x batch`` gets more daemons rather than a failed open.

Each daemon's thread in :meth:`Daemons.close` goes on, once that daemon has exited
and so holds its images no more, to record VM clock 0 in the snapshots it made
(:func:`~blktx_plugins._qcow2_format.zero_vm_clocks`): the daemon records the host's
clock there, ``qemu-img snapshot -c`` 0.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from blktx import ActionFailed
from blktx_plugins._image import Snapshot
from blktx_plugins._qcow2_format import zero_vm_clocks
from blktx_plugins._qemu import StorageDaemon, child_nofile, run_async

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A daemon costs ~20 ms of start and a process: a batch smaller than this is not split.
MIN_PER_DAEMON = 8
#: Descriptors a daemon holds per image, and what it and blktx need besides.
FDS_PER_IMAGE = 2
FDS_SPARE = 64
#: Descriptors blktx keeps per running daemon (its QMP socket and spare).
FDS_PER_DAEMON = 4


def default_daemons() -> int:
    """Daemons when ``jobs`` is not set: two per core, at least two, at most eight.
    A daemon mostly waits for ``fdatasync``, not for a core: on 2 cores, 500 images
    took 0.74 s in one daemon, 0.55 s in two, 0.46 s in four, 0.41 s in eight."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def open_fds() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def batch_limit(daemons: int = 1) -> int:
    """The most images one daemon may be given now, with ``daemons`` running: within
    the daemon's raised limit and what blktx's own soft limit leaves (< 1: none)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    mine = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - open_fds() - FDS_SPARE - FDS_PER_DAEMON * daemons
    theirs = (child_nofile() - FDS_SPARE) // FDS_PER_IMAGE
    return min(mine, theirs)


def fd_problem(images: int, jobs: int) -> str | None:
    """Why ``images`` cannot be spread over daemons within the limit of open files, or None."""
    try:
        batches(["x"] * images, jobs, dry=True)
    except ActionFailed as exc:
        return str(exc)
    return None


def batches(images: Sequence[str], jobs: int, dry: bool = False) -> list[list[str]]:
    """``images`` (distinct) split into contiguous batches of near-equal size, one per daemon."""
    n = len(images)
    if n == 0:
        return []
    want = jobs if jobs > 1 else default_daemons()
    count = max(1, min(want, n // MIN_PER_DAEMON or 1, n))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    while True:
        limit = batch_limit(count)
        if limit < 1:
            raise ActionFailed(
                f"the limit of open files (ulimit -n {soft}) leaves no room for a storage daemon's images ({open_fds()} open now)"
            )
        need = math.ceil(n / limit)
        if need <= count:
            break
        count = need
    if dry:
        return []
    size, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(list(images[start:end]))
        start = end
    return out


class _Failed:
    def __init__(self, daemon: StorageDaemon, exc: ActionFailed) -> None:
        self.daemon, self.exc = daemon, exc


class Daemons:
    """One :class:`StorageDaemon` per batch, all starting at once (spawned in turn by
    the calling thread); :meth:`close` quits them all at once. If one cannot start, the others are
    closed and its error raised: no image has been touched yet."""

    def __init__(self, groups: list[list[str]], txid: str, idents: dict[str, list[int]]) -> None:
        self.daemons: list[StorageDaemon] = []
        self.of: dict[str, StorageDaemon] = {}
        self.idents = idents
        if not groups:
            return

        # Spawned from this thread, which outlives them (a daemon dies with the thread
        # that spawned it), one after another: each starts while the next is spawned.
        errors: list[BaseException] = []
        spawned: list[StorageDaemon] = []
        for g in groups:
            try:
                spawned.append(StorageDaemon(g, txid, {i: idents[i] for i in g if i in idents}, wait=False))
            except BaseException as exc:  # noqa: BLE001 - raised below, once all are settled
                errors.append(exc)
                break
        for d in spawned:
            try:
                d.ready()
                self.daemons.append(d)
            except BaseException as exc:  # noqa: BLE001 - raised below, once all are settled
                errors.append(exc)
        if errors:
            self.close()
            raise errors[0]
        for d in self.daemons:
            for image in d.node:
                self.of[image] = d

    def node(self, image: str) -> str:
        return self.of[image].node[image]

    def each(self, calls: dict[StorageDaemon, list[tuple[Any, str, dict[str, Any]]]], timeout: float = 120.0) -> dict[Any, Any]:
        """Run each daemon's commands in order, all daemons at once: ``{key: reply
        or its ActionFailed}`` for every ``(key, command, arguments)``. A daemon's
        later commands still run after one failed (each is reported on its own)."""
        import asyncio

        async def one(d: StorageDaemon, todo: list[tuple[Any, str, dict[str, Any]]]) -> list[tuple[Any, Any]]:
            got = []
            for key, name, args in todo:
                try:
                    got.append((key, await d.execute(name, args, timeout)))
                except ActionFailed as exc:
                    got.append((key, _Failed(d, exc)))
            return got

        async def all_of() -> list[list[tuple[Any, Any]]]:
            return await asyncio.gather(*(one(d, todo) for d, todo in calls.items() if todo))

        out: dict[Any, Any] = {}
        for got in run_async(all_of()):
            for key, reply in got:
                if isinstance(reply, _Failed):  # named as its daemon, outside the loop
                    out[key] = reply.daemon.named(reply.exc)
                else:
                    out[key] = reply
        return out

    def snapshot(self, named: Sequence[tuple[T, str, str]]) -> list[tuple[list[T], Any]]:
        """Make the internal snapshot ``name`` of each ``(key, image, name)``: one QMP
        ``transaction`` per daemon (all or nothing within it), daemons at once. Each
        daemon's keys with its reply, or the ActionFailed it ended in."""
        mine: dict[StorageDaemon, list[tuple[T, str, str]]] = {}
        for item in named:
            mine.setdefault(self.of[item[1]], []).append(item)
        snapshots = {
            d: [
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": self.node(image), "name": name}}
                for _, image, name in items
            ]
            for d, items in mine.items()
        }
        replies = self.each(
            {d: [(d, "transaction", {"actions": actions})] for d, actions in snapshots.items()},
            timeout=120 + 0.5 * max(map(len, mine.values())),
        )
        return [([key for key, _, _ in items], replies[d]) for d, items in mine.items()]

    def close(self, made: Mapping[str, Sequence[Snapshot]] | None = None) -> None:
        """Quit every daemon, all at once; then, in each daemon's thread once it has
        exited, record VM clock 0 in the snapshots ``made`` (by image) that it made.
        That step is cosmetic: its failure is logged, never raised."""

        def one(d: StorageDaemon) -> None:
            d.close()  # returns once the daemon has exited: its descriptors and locks are gone
            for image in d.node:
                if made and made.get(image):
                    try:
                        zero_vm_clocks(image, self.idents.get(image), made[image])
                    except Exception as exc:  # noqa: BLE001 - cosmetic: the snapshot is made either way
                        log.debug("%s: VM clock of the new snapshot left as QEMU wrote it: %s", image, exc)

        if len(self.daemons) == 1:
            one(self.daemons[0])
        elif self.daemons:
            from concurrent.futures import ThreadPoolExecutor  # here: not at every start

            with ThreadPoolExecutor(max_workers=len(self.daemons), thread_name_prefix="blktx-qsd") as pool:
                list(pool.map(one, self.daemons))
