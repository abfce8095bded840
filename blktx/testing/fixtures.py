"""Real components for tests: qcow2 images, a live QEMU with QMP, a loop-mounted btrfs,
and what qemu-img and btrfs-progs say about them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-storage-daemon") is None,
    reason="needs qemu-img and qemu-storage-daemon (Debian qemu-utils, qemu-system-common)",
)


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def make_image(path: Path, size: str = "16M", pattern: int | None = None, snapshots: tuple[str, ...] = ()) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), size)
    if pattern is not None:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(path))
    for name in snapshots:
        run("qemu-img", "snapshot", "-c", name, str(path))
    return path


def snapshots(path: Path) -> list[tuple[str, str]]:
    out = run("qemu-img", "snapshot", "-l", "-U", str(path))
    return [(line.split()[0], line.split()[1]) for line in out.splitlines()[2:] if line.strip()]


def chain(path: Path) -> list[str]:
    out = run("qemu-img", "info", "-U", "--backing-chain", str(path))
    return [os.path.basename(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("image: ")]


def same_data(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def world(directory: Path) -> dict[str, Any]:
    """Everything a transaction could change in ``directory``, by qemu-img."""
    state: dict[str, Any] = {"files": sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))}
    for p in sorted(directory.iterdir()):
        if p.is_symlink():
            state[p.name] = ("link", os.readlink(p), chain(p))
        elif p.suffix == ".qcow2":
            state[p.name] = ("image", snapshots(p))
    return state


@pytest.fixture
def btrfs_mount(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted btrfs with a subvolume ``data`` holding one file; unmounted after."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("needs mkfs.btrfs (Debian btrfs-progs)")
    if os.geteuid() != 0:
        pytest.skip("mounting a loop btrfs needs root")
    img, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    with open(img, "wb") as fh:
        fh.truncate(256 << 20)
    run("mkfs.btrfs", "-q", str(img))
    mnt.mkdir()
    run("mount", "-o", "loop", str(img), str(mnt))
    try:
        run("btrfs", "subvolume", "create", str(mnt / "data"))
        (mnt / "data" / "file").write_text("precious")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def subvolumes(mnt: Path) -> list[str]:
    out = run("btrfs", "subvolume", "list", str(mnt))
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line)


needs_qemu_system = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64 (Debian qemu-system-x86)"
)


def one_command(address: Path | str, cmd: str, args: dict[str, Any] | None = None, *, agent: bool = False) -> Any:
    """Connect to a QMP monitor (or, with ``agent``, a guest agent), send one command,
    disconnect; its reply."""
    from blktx_plugins._qemu import Agent, Qmp

    conn = (Agent if agent else Qmp)(str(address))
    try:
        return conn.cmd(cmd, args)
    finally:
        conn.close()


class VM:
    """A real ``qemu-system-x86_64 -machine none`` with qcow2 drives and a QMP socket."""

    def __init__(self, directory: Path, name: str, drives: int = 2, paused: bool = False) -> None:
        import time

        self.name = name
        self.sock = directory / f"{name}.qmp"
        self.ctl = directory / f"{name}.ctl"  # the tests' own monitor: QEMU serves one client per monitor
        self.images = [make_image(directory / f"{name}-d{i}.qcow2", pattern=0x30 + i) for i in range(drives)]
        argv = [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.sock},server=on,wait=off",
            "-qmp",
            f"unix:{self.ctl},server=on,wait=off",
        ]
        if paused:
            argv.append("-S")
        for i, img in enumerate(self.images):
            argv += ["-drive", f"if=none,id=drive{i},file={img},format=qcow2,node-name={name}-n{i}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return one_command(self.ctl, cmd, args)

    def running(self) -> bool:
        return bool(self.qmp("query-status")["running"])

    def active_file(self, drive: int) -> str:
        for dev in self.qmp("query-block"):
            if dev["device"] == f"drive{drive}":
                return os.path.basename(str(dev["inserted"]["file"]))
        raise KeyError(drive)

    def snapshots(self, drive: int) -> list[str]:
        for dev in self.qmp("query-block"):
            if dev["device"] == f"drive{drive}":
                return [s["name"] for s in dev["inserted"]["image"].get("snapshots", [])]
        raise KeyError(drive)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.proc.wait(timeout=10)
