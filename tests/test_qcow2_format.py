"""blktx_plugins._qcow2_format: an overlay written directly is one QEMU opens, checks
clean and reads through, the same structure qemu-img writes."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import needs_qemu_img

from blktx_plugins._qcow2_format import overlay, write_overlay, zero_vm_clocks

pytestmark = needs_qemu_img

FIELDS = (
    "magic version bfo bfs cluster_bits size crypt l1_size l1_off rt_off rt_clusters nb_snap snap_off incompat compat autoclear "
    "rorder hlen"
)


def header(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return dict(zip(FIELDS.split(), struct.unpack(">4sIQIIQIIQQIIQQQQII", data[:104]), strict=True))


def qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("size", [512, 16 << 20, (512 << 20) + 512, 1 << 40])
def test_an_overlay_qemu_checks_clean_and_reads_through(tmp_path: Path, size: int) -> None:
    base = tmp_path / "base.qcow2"
    assert qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)).returncode == 0
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", str(base))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    fd = os.open(ours, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        write_overlay(fd, "base.qcow2", "qcow2", size)
    finally:
        os.close(fd)
    made = qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-u", str(theirs), str(size))
    assert made.returncode == 0
    check = qemu("qemu-img", "check", str(ours))
    assert check.returncode == 0 and "No errors" in check.stdout, check.stdout + check.stderr
    mine, qemus = header(ours), header(theirs)
    for key in ("magic", "version", "cluster_bits", "size", "l1_size", "l1_off", "rt_off", "rt_clusters", "rorder", "incompat"):
        assert mine[key] == qemus[key], key
    info = qemu("qemu-img", "info", str(ours)).stdout
    assert "backing file: base.qcow2" in info and "backing file format: qcow2" in info
    assert qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 512", str(ours)).returncode == 0
    assert qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 512", str(ours)).returncode == 0
    assert qemu("qemu-img", "check", str(ours)).returncode == 0
    assert qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 512", str(base)).returncode == 0, "the backing file untouched"


@pytest.mark.parametrize(
    ("name", "fmt", "size"),
    [("", "qcow2", 512), ("a\0b", "qcow2", 512), ("x" * 1024, "qcow2", 512), ("b", "qc ow", 512), ("b", "raw", 513)],
)
def test_what_it_cannot_write_is_refused_before_anything_is_written(name: str, fmt: str, size: int) -> None:
    with pytest.raises(ValueError):
        overlay(name, fmt, size)


# -- zero_vm_clocks: the VM clock of a snapshot blktx made --------------------------------------


def _clocked(tmp_path: Path) -> tuple[Path, list[Any]]:
    """An image with snapshots a and b, each with a VM clock of its own; its entries."""
    from blktx_plugins._image import read_image

    img = tmp_path / "img.qcow2"
    assert qemu("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M").returncode == 0
    for name in ("a", "b"):
        assert qemu("qemu-img", "snapshot", "-c", name, str(img)).returncode == 0
    with open(img, "r+b") as fh:
        for n, entry in enumerate(read_image(str(img)).entries, start=1):
            fh.seek(entry.offset + 24)
            fh.write(struct.pack(">Q", n * 1_000_000_007))
    entries = read_image(str(img)).entries
    assert [e.vm_clock_nsec for e in entries] == [1_000_000_007, 2_000_000_014]
    return img, entries


def test_zero_vm_clocks_writes_exactly_the_snapshots_named_by_id_name_and_date(tmp_path: Path) -> None:
    from blktx_plugins._image import Snapshot, read_image

    img, (a, b) = _clocked(tmp_path)
    ident = read_image(str(img)).ident
    other_date = Snapshot(b.snapshot.id, b.snapshot.name, (b.snapshot.date[0] + 1, 0))
    assert zero_vm_clocks(str(img), ident, [other_date, Snapshot(b.snapshot.id, "a", b.snapshot.date)]) == 0
    assert zero_vm_clocks(str(img), ident, [b.snapshot]) == 1
    after = read_image(str(img))
    assert [(e.snapshot, e.snapshot.date, e.vm_clock_nsec) for e in after.entries] == [
        (a.snapshot, a.snapshot.date, 1_000_000_007),
        (b.snapshot, b.snapshot.date, 0),
    ]
    assert after.ident == ident
    assert qemu("qemu-img", "check", str(img)).returncode == 0
    assert zero_vm_clocks(str(img), ident, [b.snapshot]) == 0  # 0 already: nothing written


def test_zero_vm_clocks_leaves_an_image_a_process_holds_and_a_swapped_file(tmp_path: Path) -> None:
    import fcntl

    from blktx import Refused
    from blktx_plugins._image import read_image

    img, (_, b) = _clocked(tmp_path)
    ident = read_image(str(img)).ident
    before = img.read_bytes()
    # A QEMU process that has the image open holds a shared lock on its permission bytes.
    holder = os.open(img, os.O_RDONLY)
    try:
        fcntl.fcntl(holder, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 1, 0))
        with pytest.raises(OSError, match="held by another process"):
            zero_vm_clocks(str(img), ident, [b.snapshot])
    finally:
        os.close(holder)
    assert img.read_bytes() == before
    # Another file at the checked path: not opened for writing at all.
    os.rename(img, tmp_path / "moved.qcow2")
    img.write_bytes(before)
    with pytest.raises(Refused, match="replaced"):
        zero_vm_clocks(str(img), ident, [b.snapshot])
    assert img.read_bytes() == before == (tmp_path / "moved.qcow2").read_bytes()
