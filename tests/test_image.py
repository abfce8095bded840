"""Crafted qcow2 headers (blktx_plugins._image): a hypothesis corpus of hostile
images, each read with bounded memory and time, ending in a header or a refusal."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktx import Refused
from blktx_plugins._image import read_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (Debian qemu-utils)")

#: (offset, struct format) of every header field a crafted image may lie about.
FIELDS = [
    (4, ">I"),
    (8, ">Q"),
    (16, ">I"),
    (20, ">I"),
    (24, ">Q"),
    (32, ">I"),
    (36, ">I"),
    (40, ">Q"),
    (48, ">Q"),
    (56, ">I"),
    (60, ">I"),
    (64, ">Q"),
    (72, ">Q"),
    (80, ">Q"),
    (88, ">Q"),
    (96, ">I"),
    (100, ">I"),
]
EDGES = [0, 1, 7, 8, 9, 21, 22, 64, 1023, 1024, 65535, 65536, 65537, 1 << 20, 1 << 31, (1 << 32) - 1, (1 << 63), (1 << 64) - 1]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "t.qcow2")], check=True, cwd=d
    )
    for name in ("weekly", "nightly"):
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(d / "t.qcow2")], check=True)
    return (d / "t.qcow2").read_bytes()


def _value(fmt: str, raw: int) -> int:
    return raw % (1 << (8 * struct.calcsize(fmt)))


@given(
    fields=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1))), max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 1 << 18), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 1 << 18)),
)
def test_any_crafted_header_is_read_within_bounds_or_refused(
    template: bytes,
    tmp_path_factory: pytest.TempPathFactory,
    fields: list[tuple[tuple[int, str], int]],
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    data = bytearray(template)
    for (offset, fmt), raw in fields:
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, _value(fmt, raw))
    for offset, byte in flips:
        if offset < len(data):
            data[offset] = byte
    if cut is not None:
        del data[cut:]
    path = tmp_path_factory.mktemp("crafted") / "x.qcow2"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    t = time.monotonic()
    try:
        read_image(str(path))
    except Refused:
        pass  # a clean refusal, named
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t < 5, "bounded time"
    assert peak < 200 << 20, f"bounded memory: {peak >> 20} MiB"


def test_the_template_itself_reads(template: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(template)
    header = read_image(str(path))
    assert [s.name for s in header.snapshots] == ["weekly", "nightly"]


def test_a_read_that_hangs_is_refused_at_its_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hard-mounted NFS server that stopped answering blocks a read forever; here the
    read is made to hang, and the check gives up at the deadline naming the file."""
    from blktx_plugins import _image

    release = threading.Event()

    def hung(path: str) -> object:
        release.wait(30)
        raise OSError("never answered")

    monkeypatch.setattr(_image, "_read_image", hung)
    monkeypatch.setattr(_image, "READ_TIMEOUT", 0.3)
    t = time.monotonic()
    with pytest.raises(Refused, match=r"took more than 0\.3 s"):
        _image.read_image(str(tmp_path / "on-nfs.qcow2"))
    assert time.monotonic() - t < 2
    release.set()


def test_a_batch_is_never_charged_for_waiting_behind_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch has a reader of its own: a quick read is not refused because other
    callers' long (but healthy) batches ran first (helper review)."""
    from blktx_plugins import _image

    def slow(path: str) -> object:
        time.sleep(0.05 if path.startswith("slow") else 0.0)
        return path

    monkeypatch.setattr(_image, "_read_image", slow)
    monkeypatch.setattr(_image, "READ_TIMEOUT", 1.0)
    results: dict[str, list[object]] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(f"t{n}", _image.read_images([f"slow{i}" for i in range(40)])))
        for n in range(5)
    ]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert _image.read_images(["quick"]) == ["quick"]
    for t in threads:
        t.join()
    assert all(r == [f"slow{i}" for i in range(40)] for r in results.values())


def test_a_backing_name_through_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """``./gone/../base.qcow2``: Python's realpath makes it ``base.qcow2``, the kernel
    (and so QEMU) fails at ``gone``, until whoever can create ``gone`` makes it lead
    elsewhere. Refused, as QEMU would fail."""
    from blktx_plugins._image import check_chain

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True)
    top = tmp_path / "top.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "./gone/../base.qcow2", "-F", "qcow2", str(top), "1M"]
    subprocess.run(argv, check=True)
    assert subprocess.run(["qemu-img", "info", "--backing-chain", str(top)], capture_output=True).returncode != 0
    with pytest.raises(Refused, match="goes through a folder that does not exist"):
        check_chain(str(top), [str(tmp_path)])
    (tmp_path / "gone").mkdir()  # once it exists, QEMU and blktx read the same chain
    assert subprocess.run(["qemu-img", "info", "--backing-chain", str(top)], capture_output=True).returncode == 0
    assert check_chain(str(top), [str(tmp_path)]).backing == "./gone/../base.qcow2"
