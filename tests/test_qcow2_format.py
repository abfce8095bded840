"""blktx_plugins._qcow2_format: an overlay written directly is one QEMU opens, checks
clean and reads through, the same structure qemu-img writes."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from qemu_helpers import needs_qemu_img

from blktx_plugins._qcow2_format import overlay, write_overlay

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
