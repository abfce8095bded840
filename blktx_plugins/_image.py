"""Reading qcow2 headers as hostile bytes, within QEMU's own limits.

An image may be written by a tenant or a guest: its header is data, never trusted.
Checks read it directly (no process, read-only, no lock taken) and enforce the
limits QEMU itself enforces when it opens an image, so that a crafted header can
neither make blktx allocate or read without bound nor describe something QEMU
would refuse. A FIFO or device in place of an image is refused, not waited on.

Backing files and external data files are names QEMU would open: each is refused
when QEMU would read it as a protocol (``nbd:``, ``json:``...), followed (within
these limits, by blktx itself) and refused when it resolves outside the allowed
roots. QEMU is never asked to open a chain to find out.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blktx import Refused
from blktx.params import within_roots

QCOW2_MAGIC = b"QFI\xfb"
# QEMU's limits (block/qcow2.h): a header that breaks one is refused by QEMU too.
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE: the whole table, in bytes
MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_NAME = 1023  # the header's backing_file_size
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
#: QEMU copies a snapshot's name into a 256-byte buffer (QEMUSnapshotInfo.name):
#: a longer name is silently cut, so blktx refuses it.
MAX_SNAPSHOT_NAME = 255
#: A longer chain is refused: it is not an image a person made, and it bounds the walk.
MAX_CHAIN = 64

_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
# Formats QEMU could probe a backing file as that have backing files of their own
# and that blktx does not read: refused rather than followed blind.
_OTHER_MAGICS = (b"QED\0", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"conectix", b"vhdxfile")


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot. ``date`` (seconds, nanoseconds, set by QEMU when it
    made it) is not part of equality; :meth:`same` compares the whole identity.
    ``id`` and ``name`` are QEMU's bytes decoded as UTF-8 with ``surrogateescape``:
    QEMU allows any bytes, and :func:`shown` prints them escaped."""

    id: str
    name: str
    date: tuple[int, int] = field(default=(0, 0), compare=False)

    def same(self, other: Snapshot) -> bool:
        """The same point in time: id, name and date (an id is reused after a delete)."""
        return (self.id, self.name, self.date) == (other.id, other.name, other.date)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.date[0]))
        return f"snapshot {shown(self.name)} (id {bare(self.id)}, made {when}.{self.date[1] // 1000:06d})"


def shown(text: str) -> str:
    """``text`` quoted for a message: bytes that are not UTF-8 and control characters
    escaped (``'caf\\xe9'``), so a crafted name can neither break the output's
    encoding nor act on a terminal."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in raw)
    return "'" + out.replace("'", "\\'") + "'"


def bare(text: str) -> str:
    """:func:`shown` without the quotes (a snapshot id)."""
    return shown(text)[1:-1]


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_problem(name: str) -> str | None:
    """Why QEMU would refuse or mangle ``name`` as a snapshot name, or None."""
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL character (QEMU would cut it there)"
    if not is_utf8(name):
        return "is not valid UTF-8 (QMP carries UTF-8 only)"
    if len(name.encode()) > MAX_SNAPSHOT_NAME:
        return f"is {len(name.encode())} bytes long; QEMU keeps at most {MAX_SNAPSHOT_NAME} and cuts the rest"
    return None


@dataclass(frozen=True)
class Header:
    """What blktx reads of a qcow2 header."""

    version: int
    size: int
    snapshots: list[Snapshot]
    backing: str | None
    backing_format: str | None
    data_file: str | None
    ident: list[int]
    #: Each snapshot's table entry: where it lies in the file and its VM clock.
    entries: list[Entry] = field(default_factory=list, compare=False, repr=False)


@dataclass(frozen=True)
class Entry:
    """A snapshot's entry in the snapshot table (QEMU's docs/interop/qcow2.txt)."""

    offset: int  # of the entry's first byte, in the file
    snapshot: Snapshot
    vm_clock_nsec: int  # bytes 24..31 of the entry


def open_image(path: str) -> int:
    """A read-only descriptor of the regular file ``path`` (never a symlink at the
    last component, never a FIFO or device: opened non-blocking, then checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise Refused(f"{path} does not exist", hint="check the path", missing=path) from None
    except IsADirectoryError:
        raise Refused(f"{path} is a directory, not an image") from None
    except PermissionError:
        raise Refused(f"{path} is not readable by this user") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(
                f"{path} is a symlink; give the image itself", hint=f"the link points to {os.path.realpath(path)}"
            ) from None
        raise Refused(f"{path} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{path} is not a regular file (a FIFO, socket or device is never read as an image)")
    return fd


def _read(fd: int, offset: int, length: int, path: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise Refused(f"{path}: qcow2 header points past the end of the file (offset {offset})")
    return data


#: Seconds a header read may take before the image is refused: a hard-mounted NFS
#: server that stopped answering blocks a read forever (and uninterruptibly).
READ_TIMEOUT = 30.0


class _Batch:
    """Paths a reader thread reads one after another; ``found`` grows as it goes."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths
        self.found: list[Header | BaseException] = []
        self.moved = threading.Condition()
        self.abandoned = False  # its caller gave up on it: read no further

    def read(self) -> None:
        for path in self.paths:
            if self.abandoned:
                return
            try:
                got: Header | BaseException = _read_image(path)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                got = exc
            with self.moved:
                self.found.append(got)
                self.moved.notify()


class _Reader:
    """A daemon thread that reads the batches put to it, and is idle between them."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="blktx-header", daemon=True).start()

    def put(self, batch: _Batch) -> None:
        self.jobs.put(batch)

    def _run(self) -> None:
        while True:
            self.jobs.get().read()
            with _idle_lock:  # back to work only once its batch is read, or given up on
                _idle.append(self)


_idle: list[_Reader] = []
_idle_lock = threading.Lock()


def _reader() -> _Reader:
    with _idle_lock:
        if _idle:
            return _idle.pop()
    return _Reader()


def read_images(paths: Sequence[str]) -> list[Header | BaseException]:
    """The headers of ``paths`` (see :func:`read_image`), each a :class:`Header` or what
    :func:`read_image` would raise for it, in order.

    A reader thread of the batch's own (an idle one, else a new one) reads them one
    after another: one hand-off per batch, not per image (~16 µs an image instead of
    ~77), and never queued behind another caller's batch. Every read has
    :data:`READ_TIMEOUT`: the image whose read outlives it is refused, its reader is left
    behind (a daemon thread: a read stuck on a hung mount cannot be cancelled, and must
    not keep the process alive; it is never given work again), and the rest go on in
    another reader.
    """
    out: list[Header | BaseException] = []
    todo = list(paths)
    while todo:
        batch = _Batch(todo)
        _reader().put(batch)
        with batch.moved:
            while len(batch.found) < len(todo):
                seen = len(batch.found)
                deadline = time.monotonic() + READ_TIMEOUT
                while len(batch.found) == seen and time.monotonic() < deadline:
                    batch.moved.wait(deadline - time.monotonic())
                if len(batch.found) == seen:
                    break
            found, batch.abandoned = list(batch.found), True
        out.extend(found)
        if len(found) == len(todo):
            break
        stuck = todo[len(found)]
        out.append(
            Refused(
                f"{stuck}: reading its header took more than {READ_TIMEOUT:g} s (a hung network mount?)",
                hint="check the mount; blktx does not wait on it",
            )
        )
        todo = todo[len(found) + 1 :]
    return out


def read_image(path: str) -> Header:
    """The header of the qcow2 image ``path`` (see :func:`open_image`), within QEMU's limits.

    Raises :class:`Refused` naming the file when it is missing, not a regular file,
    not qcow2, breaks a limit, or cannot be read within :data:`READ_TIMEOUT` (the
    reading thread is left behind: a read stuck on a hung mount cannot be cancelled;
    a new reader replaces it).
    """
    (got,) = read_images([path])
    if isinstance(got, BaseException):
        raise got
    return got


def _read_image(path: str) -> Header:
    fd = open_image(path)
    try:
        return _parse(fd, path)
    finally:
        os.close(fd)


def read_open(fd: int, path: str) -> Header:
    """The header of the qcow2 image open as ``fd`` (named ``path`` in errors), read
    in this thread, within the same limits as :func:`read_image`."""
    return _parse(fd, path)


def read_header(path: str) -> tuple[int, list[Snapshot], str | None]:
    """The qcow2 version, internal snapshots and backing file name of ``path``."""
    h = read_image(path)
    return h.version, h.snapshots, h.backing


def _parse(fd: int, path: str) -> Header:
    st = os.fstat(fd)
    head = os.pread(fd, 104, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise Refused(f"{path} is not a qcow2 image", hint="check the path; `qemu-img info` shows its format")
    version, backing_off, backing_len, cluster_bits, size = struct.unpack(">IQIIQ", head[4:32])
    l1_size, _l1_off, _rt_off, rt_clusters, nb, snap_off = struct.unpack(">IQQIIQ", head[36:72])

    def bad(what: str) -> Refused:
        return Refused(f"{path}: {what}; QEMU refuses such an image", hint="`qemu-img check` examines it")

    if version not in (2, 3):
        raise bad(f"qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {cluster_bits}")
    cluster = 1 << cluster_bits
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"an L1 table of {l1_size} entries")
    if rt_clusters * cluster > MAX_REFTABLE_BYTES:
        raise bad(f"a refcount table of {rt_clusters} clusters")
    if nb > MAX_SNAPSHOTS:
        raise bad(f"{nb} snapshots (at most {MAX_SNAPSHOTS})")
    if backing_len > MAX_BACKING_NAME:
        raise bad(f"a backing file name of {backing_len} bytes (at most {MAX_BACKING_NAME})")
    backing = None
    if backing_off:
        if backing_off + backing_len > cluster:
            raise bad("a backing file name outside the first cluster")
        backing = _read(fd, backing_off, backing_len, path).decode("utf-8", "surrogateescape")
    header_len = 72
    if version == 3:
        if len(head) < 104:
            raise bad("a truncated version 3 header")
        header_len = struct.unpack(">I", head[100:104])[0]
        if not 104 <= header_len <= cluster:
            raise bad(f"header_length {header_len}")
    backing_format, data_file = _extensions(fd, path, header_len, backing_off or cluster, bad)
    entries = _snapshots(fd, path, nb, snap_off, st.st_size, bad) if nb else []
    snaps = [e.snapshot for e in entries]
    return Header(version, size, snaps, backing, backing_format, data_file, [st.st_dev, st.st_ino], entries)


def _extensions(fd: int, path: str, start: int, end: int, bad: Callable[[str], Refused]) -> tuple[str | None, str | None]:
    """The backing format and external data file name, from the header extensions
    (which QEMU requires to lie between the header and the backing name)."""
    area = os.pread(fd, max(0, end - start), start)
    backing_format = data_file = None
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack(">II", area[pos : pos + 8])
        if kind == 0:
            break
        data = area[pos + 8 : pos + 8 + length]
        if len(data) != length:
            raise bad("a header extension past the first cluster")
        if kind == _EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "surrogateescape")
        elif kind == _EXT_DATA_FILE:
            data_file = data.decode("utf-8", "surrogateescape")
        pos += 8 + (length + 7) // 8 * 8
    return backing_format, data_file


def _snapshots(fd: int, path: str, nb: int, offset: int, file_size: int, bad: Callable[[str], Refused]) -> list[Entry]:
    # Read as the entries need it, 64 KiB at a time, never past QEMU's limit on the
    # whole table nor the end of the file.
    limit = min(MAX_SNAPSHOTS_SIZE, max(0, file_size - offset))
    table = bytearray()

    def upto(end: int) -> None:
        if end > limit:
            raise bad("a snapshot table past the end of the file or larger than 64 MiB")
        while len(table) < end:
            chunk = os.pread(fd, min(limit, max(end, len(table) + 65536)) - len(table), offset + len(table))
            if not chunk:
                raise bad("a snapshot table past the end of the file")
            table.extend(chunk)

    snaps, pos = [], 0
    for _ in range(nb):
        upto(pos + 40)
        (_l1, _l1size, id_len, name_len, dsec, dnsec, vm_clock, _vmsize, extra) = struct.unpack_from(">QIHHIIQII", table, pos)
        if extra > MAX_SNAPSHOT_EXTRA:
            raise bad(f"snapshot extra data of {extra} bytes")
        start = pos + 40 + extra
        end = start + id_len + name_len
        upto(end)
        sid = bytes(table[start : start + id_len]).decode("utf-8", "surrogateescape")
        name = bytes(table[start + id_len : end]).decode("utf-8", "surrogateescape")
        snaps.append(Entry(offset + pos, Snapshot(sid, name, (dsec, dnsec)), vm_clock))
        pos = end + (8 - (end - pos) % 8) % 8
    return snaps


def has_protocol(name: str) -> bool:
    """Whether QEMU would read ``name`` as ``protocol:...`` rather than a file name:
    a ``:`` before any ``/`` (QEMU's ``path_has_protocol``), ``json:`` included."""
    head = name.split("/", 1)[0]
    return ":" in head


def within(path: str, roots: list[str]) -> bool:
    """Whether ``path`` (every symlink resolved) lies under one of ``roots``: the
    same rule the core confines spec paths with."""
    return within_roots(path, roots)


def _other_format(path: str) -> bytes | None:
    """The magic of a format QEMU could probe ``path`` as that has its own backing
    files and that blktx does not read; None for qcow2 or raw."""
    fd = open_image(path)
    try:
        head = os.pread(fd, 32, 0)
    finally:
        os.close(fd)
    return next((m for m in _OTHER_MAGICS if head.startswith(m)), None)


def check_chain(
    path: str, roots: list[str], header: Header | None = None, opened_as: str | None = None, opens: list[str] | None = None
) -> Header:
    """Refuse an image whose backing chain or data file QEMU would reach outside
    ``roots`` or through a protocol; return ``path``'s own header.

    Each name is resolved as QEMU resolves it: joined to the folder of the *name*
    the image that names it was opened by (``opened_as``, a device symlink that leads
    to ``path``: its own folder, not its target's), refused if it has a protocol prefix, confined to
    ``roots``, and read by blktx within the limits above. A chain that loops or is
    longer than :data:`MAX_CHAIN` is refused. ``opens``: appended the real path of
    every data and backing file the chain names, in order (what QEMU would open).
    """
    top = header or read_image(path)
    current, h = os.path.realpath(path), top
    opened = os.path.abspath(opened_as or path)  # the name QEMU has for the image: backing names join its folder
    seen = {tuple(top.ident)}
    for _ in range(MAX_CHAIN):
        for what, name in (("external data file", h.data_file), ("backing file", h.backing)):
            if name is None:
                continue
            if not name or "\0" in name:
                raise Refused(f"{current}: its {what} name {shown(name)} is empty or holds a NUL character [rule confined-paths]")
            if has_protocol(name):
                raise Refused(
                    f"{current}: its {what} {shown(name)} names a protocol, not a file "
                    "[rule confined-paths]: QEMU would connect to or parse it",
                    hint="rebase the image onto a file: qemu-img rebase -u -F FMT -b ./FILE IMAGE",
                )
            resolved = os.path.join(os.path.dirname(opened), name)
            if not os.path.isdir(os.path.dirname(resolved)):  # as the kernel resolves it: ``gone/../x`` fails
                raise Refused(
                    f"{current}: its {what} {shown(name)} goes through a folder that does not exist "
                    "[rule confined-paths]: QEMU could not open it, and whoever creates that folder would choose the file"
                )
            if not within(resolved, roots):
                raise Refused(
                    f"{current}: its {what} {shown(name)} resolves to {os.path.realpath(resolved)}, "
                    f"outside the allowed roots ({', '.join(roots)}) [rule confined-paths]",
                    hint="widen with --root DIR if that chain is yours",
                )
        try:
            if h.data_file is not None:
                data = os.path.realpath(os.path.join(os.path.dirname(opened), h.data_file))
                os.close(open_image(data))
                if opens is not None:
                    opens.append(data)
            if h.backing is None:
                return top
            nxt_name = os.path.join(os.path.dirname(opened), h.backing)
            nxt = os.path.realpath(nxt_name)
            if opens is not None:
                opens.append(nxt)
            fmt = h.backing_format
            if fmt not in (None, "qcow2", "raw"):
                raise Refused(
                    f"its backing file {shown(h.backing)} is recorded as {shown(fmt or '')}, "
                    "which blktx does not read [rule confined-paths]"
                )
            other = _other_format(nxt) if fmt is None else None
            if other is not None:
                raise Refused(
                    f"its backing file {nxt} has no recorded format and looks like {other!r} (QEMU "
                    "would probe it), which blktx does not read [rule confined-paths]",
                    hint="record the format: qemu-img rebase -u -F FMT -b NAME IMAGE",
                )
            if fmt == "raw":
                return top
            fd = open_image(nxt)
        except Refused as exc:  # say which image of the chain names it
            raise Refused(f"{current}: {exc}" if not str(exc).startswith(current + ":") else str(exc), hint=exc.hint) from None
        try:
            if os.pread(fd, 4, 0) != QCOW2_MAGIC:
                if fmt == "qcow2":
                    raise Refused(f"{current}: its backing file {nxt} is recorded as qcow2 but is not")
                return top  # raw: the chain ends
            h = _parse(fd, nxt)
        finally:
            os.close(fd)
        if tuple(h.ident) in seen:
            raise Refused(f"{path}: its backing chain loops at {nxt} [rule confined-paths]")
        seen.add(tuple(h.ident))
        current, opened = nxt, nxt_name
    raise Refused(f"{path}: its backing chain is longer than {MAX_CHAIN} images [rule confined-paths]")


def open_verified(path: str, ident: list[int] | None) -> int:
    """A descriptor of ``path`` that is the file checked as ``ident`` (device,
    inode), or :class:`Refused`: the path was swapped since the check. QEMU is then
    given ``/proc/self/fd/N`` rather than the path, so it opens that very file."""
    fd = open_image(path)
    st = os.fstat(fd)
    if ident and [st.st_dev, st.st_ino] != list(ident):
        os.close(fd)
        raise Refused(f"{path} was replaced by another file since the check [rule confined-paths]; left alone")
    return fd
