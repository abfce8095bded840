"""qcow2 structures written directly, without a ``qemu-img`` process per image: an
empty overlay, and the VM clock of an internal snapshot blktx made.

An empty overlay:

An overlay that holds no data yet is a fixed structure (QEMU's docs/interop/qcow2.txt):
a version 3 header with the backing file's name and format, one refcount table, one
refcount block and an all-zero L1 table, 64 KiB clusters, 16-bit refcounts. This is
the layout ``qemu-img create -f qcow2 -b NAME -F FMT -u`` writes, less its optional
feature-name table: ``qemu-img check`` finds it clean and QEMU opens it as it opens
its own. It is written through a descriptor in one ``pwritev`` and made durable with
``fdatasync`` (as ``qemu-img`` does when it closes the image), so a crash leaves
either no overlay (the caller publishes it only afterwards) or a whole one.

The VM clock: QEMU records in each internal snapshot the guest's clock when it was
made (bytes 24..31 of its snapshot table entry, ``vm_clock_nsec``). A snapshot that
``qemu-storage-daemon`` makes gets the host's realtime clock there, which
``qemu-img snapshot -l`` shows as some 500,000 hours; ``qemu-img snapshot -c``
records 0. :func:`zero_vm_clocks` writes 0 into the entries of the snapshots blktx
made offline, once no process has the image open (QEMU may rewrite or move the
table of an image it has open): a cosmetic step, whose caller ignores its failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence

from blktx_plugins._image import Snapshot, open_verified, read_open

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
#: Bytes of guest data one L2 table maps (8-byte entries, one cluster each).
L2_COVERS = (CLUSTER // 8) * CLUSTER
HEADER_LENGTH = 112  # version 3 with the compression type byte (0: zlib) and padding
EXT_BACKING_FORMAT = 0xE2792ACA
#: Largest virtual size written here (QEMU's own limit is 2 EiB; this keeps the L1
#: table within 32 MiB, far beyond any disk an overlay is made for).
MAX_SIZE = 1 << 52


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def overlay(backing: str, backing_format: str, size: int) -> list[tuple[int, bytes]]:
    """The pieces of an empty overlay of ``backing`` (the name stored in it, as QEMU
    will resolve it) and its offsets; the file's length is the last piece's end."""
    name, fmt = backing.encode(), backing_format.encode()
    if not 0 < len(name) <= 1023 or b"\0" in name:
        raise ValueError(f"backing file name {backing!r}: 1 to 1023 bytes, no NUL")
    if not fmt or len(fmt) > 16 or not fmt.isalnum():
        raise ValueError(f"backing format {backing_format!r}")
    if not 0 <= size <= MAX_SIZE or size % 512:
        raise ValueError(f"virtual size {size}: a multiple of 512 up to {MAX_SIZE}")
    l1_size = -(-size // L2_COVERS)
    l1_clusters = max(1, -(-l1_size * 8 // CLUSTER))
    refcount_table, refcount_block, l1_table = CLUSTER, 2 * CLUSTER, 3 * CLUSTER
    clusters = 3 + l1_clusters  # header, refcount table, refcount block, L1 table
    extensions = _extension(EXT_BACKING_FORMAT, fmt) + _extension(0, b"")
    backing_offset = HEADER_LENGTH + len(extensions)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb",
        3,
        backing_offset,
        len(name),
        CLUSTER_BITS,
        size,
        0,  # no encryption
        l1_size,
        l1_table,
        refcount_table,
        1,  # refcount table clusters
        0,  # snapshots
        0,
        0,  # incompatible features
        0,  # compatible features
        0,  # autoclear features
        4,  # refcount order: 16-bit refcounts
        HEADER_LENGTH,
    ) + bytes(HEADER_LENGTH - 104)
    first = header + extensions + name
    assert len(first) <= CLUSTER
    return [
        (0, first),
        (refcount_table, struct.pack(">Q", refcount_block)),
        (refcount_block, struct.pack(f">{clusters}H", *([1] * clusters))),
        # the L1 table is all zeros: the file's length covers it, nothing needs writing
        (l1_table + max(l1_size * 8, 8), b""),
    ]


def write_overlay(fd: int, backing: str, backing_format: str, size: int) -> None:
    """Write an empty qcow2 overlay into the empty file open as ``fd`` and make it
    durable. Raises ValueError for what cannot be written, OSError from the disk."""
    pieces = overlay(backing, backing_format, size)
    os.ftruncate(fd, pieces[-1][0])
    for offset, data in pieces:
        if data:
            os.pwrite(fd, data, offset)
    os.fdatasync(fd)


#: Where ``vm_clock_nsec`` lies in a snapshot table entry (docs/interop/qcow2.txt).
VM_CLOCK_OFFSET = 24
#: QEMU's image locking takes OFD locks on bytes 100.. (permissions held) and
#: 200.. (permissions not shared) of an image it has open (as ``_qemu.holder`` reads them).
_QEMU_LOCK_START, _QEMU_LOCK_LEN = 100, 200


def zero_vm_clocks(path: str, ident: list[int] | None, snaps: Sequence[Snapshot]) -> int:
    """Record VM clock 0, as ``qemu-img snapshot -c`` does, in the table entries of
    ``snaps`` (each found by id, name *and* date) of the image ``path``, the file
    checked as ``ident`` (device, inode); return how many entries were written.

    Only while no process holds the image: QEMU's lock bytes are taken exclusively
    for the moment of the write (a QEMU process that has the image open holds them,
    and one that opens it meanwhile is refused its lock), and the table is read
    again under them. Each write is 8 aligned bytes, one sector: a crash leaves the
    entry with QEMU's clock or with 0, never torn. Not made durable (cosmetic: no
    ``fsync``). Raises :class:`OSError` or :class:`~blktx.Refused` when it cannot.
    """
    checked = open_verified(path, ident)  # the checked file, by identity
    try:
        # Writable through the checked descriptor (never the path again): same inode.
        fd = os.open(f"/proc/self/fd/{checked}", os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(checked)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START, _QEMU_LOCK_LEN, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OSError(exc.errno, f"{path} is held by another process (QEMU image lock); left alone") from None
            raise
        written = 0
        for entry in read_open(fd, path).entries:
            if entry.vm_clock_nsec and any(entry.snapshot.same(s) for s in snaps):
                os.pwrite(fd, bytes(8), entry.offset + VM_CLOCK_OFFSET)
                written += 1
        return written
    finally:
        os.close(fd)  # releases the lock
