"""A real guest for the fsfreeze tests: the host's Debian kernel and an initramfs
built here (busybox, the host's ``qemu-ga`` with its libraries, the virtio and
ext4 modules), booted by ``qemu-system-x86_64`` with a virtio-blk ext4 disk and
a virtio-serial agent channel. No network, no distribution image.

The guest mounts its disk at ``/mnt``, starts ``qemu-ga`` on the channel and
appends a line to ``/mnt/ticks`` every 10 ms, so its filesystem always has
writes in flight.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from blktx.testing.fixtures import one_command

MODULES = [
    "crypto/crc32c_generic",
    "lib/crc16",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "drivers/char/virtio_console",
]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "guest: insmod $m failed"; done
mkdir -p /mnt /run/qga
sleep 0.2
mount -t ext4 /dev/vda /mnt || echo "guest: mount failed"
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
done
/usr/sbin/qemu-ga -m virtio-serial -p $port -t /run/qga &
echo "guest: ready, agent on $port"
while true; do date >> /mnt/ticks; sleep 0.01; done
"""


def kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def why_not() -> str | None:
    """Why no guest can run here, or None."""
    for tool in ("qemu-system-x86_64", "qemu-ga", "mkfs.ext4", "busybox"):
        if shutil.which(tool) is None and not os.path.exists(f"/bin/{tool}"):
            return f"needs {tool}"
    if kernel() is None:
        return "needs a kernel in /boot (Debian linux-image-amd64)"
    return None


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def build_initramfs(path: Path) -> Path:
    """The guest's initramfs: a gzipped newc cpio archive."""
    version = os.path.basename(str(kernel())).removeprefix("vmlinuz-")
    moddir = Path("/lib/modules") / version / "kernel"
    files: dict[str, bytes] = {}  # archive path -> content
    busybox = shutil.which("busybox") or "/bin/busybox"
    files["bin/busybox"] = Path(busybox).read_bytes()
    files["init"] = INIT.encode()
    order = []
    for mod in MODULES:
        src = moddir / f"{mod}.ko"
        if not src.exists() and (moddir / f"{mod}.ko.xz").exists():
            import lzma

            files[f"lib/modules/{os.path.basename(mod)}.ko"] = lzma.decompress((moddir / f"{mod}.ko.xz").read_bytes())
        else:
            files[f"lib/modules/{os.path.basename(mod)}.ko"] = src.read_bytes()
        order.append(os.path.basename(mod))
    files["modules.order"] = "\n".join(order).encode()
    files["usr/sbin/qemu-ga"] = Path("/usr/sbin/qemu-ga").read_bytes()
    for lib in _libraries("/usr/sbin/qemu-ga"):
        files[lib.lstrip("/")] = Path(os.path.realpath(lib)).read_bytes()
    _write_cpio(path, files)
    return path


def _write_cpio(path: Path, files: dict[str, bytes]) -> None:
    dirs = sorted(
        {str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)}
        | {"proc", "sys", "dev", "mnt", "run", "tmp"}
    )
    buf = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        buf.write(header + name.encode() + b"\0")
        buf.write(b"\0" * (-(110 + len(name) + 1) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
        ino += 1

    for d in dirs:
        entry(d, stat.S_IFDIR | 0o755, b"")
    for name, data in files.items():
        mode = 0o755 if name in ("init", "bin/busybox", "usr/sbin/qemu-ga") or ".so" in name else 0o644
        entry(name, stat.S_IFREG | mode, data)
    entry("TRAILER!!!", 0, b"")
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1))


def make_disk(path: Path) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


class Guest:
    """A booted guest: ``sock`` (QMP for blktx), ``ctl`` (QMP for the test),
    ``agent`` (the host end of its agent channel), ``disk`` (its qcow2 image)."""

    def __init__(self, directory: Path, initramfs: Path, timeout: float = 120) -> None:
        self.sock, self.ctl = directory / "guest.qmp", directory / "guest.ctl"
        self.agent = directory / "guest-agent.sock"
        self.disk = make_disk(directory / "guest-disk.qcow2")
        self.console = directory / "guest-console.log"
        # TCG: /dev/kvm exists on these machines but a KVM guest never starts there.
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel()),
            "-initrd",
            str(initramfs),
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3",
            "-serial",
            f"file:{self.console}",
            "-qmp",
            f"unix:{self.sock},server=on,wait=off",
            "-qmp",
            f"unix:{self.ctl},server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,path={self.agent},server=on,wait=off,id=qga0",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-drive",
            f"if=none,id=drive0,file={self.disk},format=qcow2",
            "-device",
            "virtio-blk-pci,drive=drive0",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the guest's QEMU exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if "guest: ready" in (self.console.read_text(errors="replace") if self.console.exists() else ""):
                try:
                    self.cmd_agent("guest-ping")
                    return
                except Exception:  # noqa: BLE001 - the agent is still starting
                    pass
            time.sleep(0.2)
        self.quit()
        raise RuntimeError(f"the guest did not come up in {timeout:g} s; console:\n{self.console.read_text()[-2000:]}")

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return one_command(self.ctl, cmd, args)

    def cmd_agent(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return one_command(self.agent, cmd, args, agent=True)

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def superblock_features(disk: Path, snapshot: str, work: Path) -> str:
    """The ext4 features line of the filesystem as it is in ``snapshot`` of ``disk``."""
    raw = work / f"{snapshot}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={snapshot}", str(disk), str(raw)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True).stdout
    raw.unlink()
    return next(line for line in out.splitlines() if line.startswith("Filesystem features:"))
