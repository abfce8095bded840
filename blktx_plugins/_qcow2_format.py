"""An empty qcow2 overlay written directly, without a ``qemu-img`` process per image.

An overlay that holds no data yet is a fixed structure (QEMU's docs/interop/qcow2.txt):
a version 3 header with the backing file's name and format, one refcount table, one
refcount block and an all-zero L1 table, 64 KiB clusters, 16-bit refcounts. This is
the layout ``qemu-img create -f qcow2 -b NAME -F FMT -u`` writes, less its optional
feature-name table: ``qemu-img check`` finds it clean and QEMU opens it as it opens
its own. It is written through a descriptor in one ``pwritev`` and made durable with
``fdatasync`` (as ``qemu-img`` does when it closes the image), so a crash leaves
either no overlay (the caller publishes it only afterwards) or a whole one.
"""

from __future__ import annotations

import os
import struct

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
