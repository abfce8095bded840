"""Real libvirt for tests: the embedded QEMU driver in the test process, a private
``libvirtd`` (in a mount namespace of its own, so it never meets the machine's
libvirt) with an ``sshd`` beside it that plays "another host", and TCG domains
with qcow2 disks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from qemu_helpers import make_image

QEMU_CONF = """user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""


def libvirt_missing() -> str | None:
    """Why libvirt cannot be used here, naming the component, or None."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "needs libvirt-python (pip install 'blktx[libvirt]')"
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        return "needs qemu-system-x86_64 and qemu-img (Debian qemu-system-x86, qemu-utils)"
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"):
        return "needs libvirt's QEMU driver (Debian libvirt-daemon-driver-qemu)"
    import grp
    import pwd

    try:
        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        return "needs the libvirt-qemu user and group that libvirt's QEMU driver expects (scripts/install makes them)"
    if os.geteuid() != 0:
        return "needs root (domains run as root with security_driver none)"
    return None


def domain_xml(name: str, images: list[Path], agent: bool = False) -> str:
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img}'/>"
        f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, img in enumerate(images)
    )
    channel = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" if agent else ""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>24</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}{channel}</devices></domain>"
    )


def define(conn: Any, directory: Path, name: str, disks: int = 2, start: bool = True, agent: bool = False) -> Any:
    images = [make_image(directory / f"{name}-d{i}.qcow2", pattern=0x30 + i) for i in range(disks)]
    dom = conn.defineXML(domain_xml(name, images, agent))
    if start:
        dom.create()
    return dom


def chains(dom: Any) -> dict[str, list[str]]:
    """Each disk's chain of images as the domain XML (persistent, and live when
    running) tells it, newest first."""
    out = {}
    for flags in (0, 2):  # live (or inactive when shut off), and VIR_DOMAIN_XML_INACTIVE
        for disk in ET.fromstring(dom.XMLDesc(flags)).findall("./devices/disk"):
            files, node = [], disk
            while node is not None and node.find("source") is not None:
                files.append(node.find("source").get("file"))  # type: ignore[union-attr]
                node = node.find("backingStore")
            out[f"{disk.find('target').get('dev')}{'' if flags == 0 else '/inactive'}"] = files  # type: ignore[union-attr]
    return out


def seen(dom: Any) -> dict[str, Any]:
    """Everything a libvirt snapshot could change about a domain."""
    return {
        "chains": chains(dom),
        "snapshots": sorted(s.getName() for s in dom.listAllSnapshots(0)),
        "state": dom.state()[0],
        "current": dom.hasCurrentSnapshot(0),
    }


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A private ``libvirtd`` and ``sshd`` in a mount namespace: libvirt's fixed
    folders (/run/libvirt, /var/lib/libvirt, /etc/libvirt, …) are folders of the
    test there. Reached locally as ``qemu+unix:///system?socket=…`` and, as a second
    host, as ``qemu+ssh://root@127.0.0.1:PORT/system`` with a throwaway key."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        for sub in ("run", "lib", "log", "etc", "cache", "ssh"):
            (directory / sub).mkdir(mode=0o700)
        (directory / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (directory / "etc" / "libvirtd.conf").write_text('auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
        self.socket = directory / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.port = free_port()
        ssh = directory / "ssh"
        self.ssh_ready = False
        if shutil.which("ssh") and os.path.exists("/usr/sbin/sshd") and shutil.which("ssh-keygen"):
            for key in ("host", "user"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
            shutil.copy(ssh / "user.pub", ssh / "authorized_keys")
            (ssh / "sshd_config").write_text(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {ssh / 'host'}\n"
                f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nUsePAM no\nStrictModes no\nPidFile {ssh / 'sshd.pid'}\n"
            )
            self.ssh_ready = True
        self.ssh_uri = f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={ssh / 'user'}&no_verify=1&no_tty=1"
        binds = " && ".join(
            f"mkdir -p {dst} && mount --bind {directory / src} {dst}"
            for src, dst in (
                ("run", "/run/libvirt"),
                ("lib", "/var/lib/libvirt"),
                ("log", "/var/log/libvirt"),
                ("etc", "/etc/libvirt"),
                ("cache", "/var/cache/libvirt"),
            )
        )
        sshd = f"mkdir -p /run/sshd && /usr/sbin/sshd -f {ssh / 'sshd_config'} -E {ssh / 'log'} && " if self.ssh_ready else ""
        script = (
            f"mount --make-rprivate / && {binds} && {sshd}"
            "exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid"
        )
        self.log = open(directory / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script], stdout=self.log, stderr=self.log, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {(directory / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        from blktx_plugins.libvirt import open_connection

        try:
            conn = open_connection(self.uri)
            for dom in conn.listAllDomains(0):
                if dom.isActive():
                    dom.destroy()
            conn.close()
        finally:
            pid = self.dir / "ssh" / "sshd.pid"
            if pid.exists():
                os.kill(int(pid.read_text()), 15)
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.log.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
