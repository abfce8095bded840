"""A VM's QMP monitor that another client holds, told at once.

QEMU serves one client per monitor. While one is connected (libvirt holds the only
monitor of its domains) QEMU accepts no other: a second client's connection waits
in the listening socket's queue for a greeting that never comes, and a plain
connect would only time out. :class:`Monitor` connects like
:class:`~blktx_plugins._qemu.Qmp`, but when no greeting came within
:data:`GREETING_WAIT` it looks whether a connection still waits unaccepted in the
queue of the monitor's listening socket -- a unix socket through the kernel's
``sock_diag`` (the socket found by its file's inode), a TCP port of this host
through ``/proc/net/tcp`` -- and then raises :class:`MonitorBusy` at once. A monitor
it cannot look at (a TCP port of another host) is waited for as before, and a
timeout is reported as busy or hung too: never as a VM that died.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from typing import TYPE_CHECKING

from blktx_plugins._qemu import Qmp, VmGone

#: Seconds a monitor may take to greet before blktx looks whether it is held.
GREETING_WAIT = 1.0
#: How often it looks again while the connect goes on.
POLL = 0.1


class MonitorBusy(VmGone):
    """The VM's monitor is held by another client, or hangs: the VM is not known to
    be dead (an undo never treats it as gone: it fails, and is left for recover)."""


def busy_message(address: str) -> str:
    return f"the VM's QMP monitor {address} is held by another client (libvirt?): for libvirt's domains use the libvirt.* types"


class Monitor(Qmp):
    """A connection to a VM's QMP monitor that tells a held monitor at once."""

    async def open(self) -> None:
        import asyncio  # only where a connection is made (start-up stays light)

        opening = asyncio.ensure_future(Qmp.open(self))
        wait = GREETING_WAIT
        try:
            while not opening.done():
                await asyncio.wait({opening}, timeout=wait)
                wait = POLL
                if not opening.done() and unaccepted(self.address):
                    opening.cancel()
                    await asyncio.wait({opening})
                    raise MonitorBusy(busy_message(self.address))
        except asyncio.CancelledError:
            opening.cancel()
            raise
        failed = opening.exception()
        if isinstance(failed, VmGone) and "timed out" in str(failed):
            raise MonitorBusy(f"{busy_message(self.address)} (or QEMU hangs: no greeting in {self.timeout:g} s)") from None
        opening.result()


def unaccepted(address: str) -> bool | None:
    """Whether a connection waits unaccepted in the queue of the listening socket at
    ``address`` (a unix socket path, or ``tcp:host:port`` of this host); None when
    that cannot be told."""
    try:
        return _tcp_waiting(address[4:]) if address.startswith("tcp:") else _unix_waiting(address)
    except (OSError, ValueError):
        return None


# -- unix sockets: sock_diag (netlink) -------------------------------------------------------

_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_ERROR, _NLMSG_DONE = 1, 0x300, 2, 3
_UDIAG_SHOW_VFS, _UDIAG_SHOW_RQLEN = 2, 16
_UNIX_DIAG_VFS, _UNIX_DIAG_RQLEN = 1, 4
_TCP_LISTEN = 10


def _unix_waiting(path: str) -> bool | None:
    """The listening unix socket bound at ``path`` (by its file's device and inode),
    and whether its queue holds connections."""
    st = os.stat(path)
    if not stat.S_ISSOCK(st.st_mode):
        return None
    dev = os.major(st.st_dev) << 20 | os.minor(st.st_dev)  # as the kernel reports it
    for vfs, queued in _unix_listeners():
        if vfs == (st.st_ino, dev):
            return queued > 0
    return None


def _unix_listeners() -> list[tuple[tuple[int, int], int]]:
    """Every listening unix socket bound to a file: ((inode, dev) of the file, the
    connections in its queue)."""
    import socket  # here: every start of blktx would pay for it

    request = struct.pack(
        "=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS | _UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF
    )
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
    found: list[tuple[tuple[int, int], int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            at = 0
            while at + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, at)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag refused the request")
                vfs, queued = None, 0
                attr = at + 32  # nlmsghdr (16) + unix_diag_msg (16)
                while attr + 4 <= at + length:
                    size, what = struct.unpack_from("=HH", data, attr)
                    if size < 4:
                        break
                    if what == _UNIX_DIAG_VFS:
                        vfs = struct.unpack_from("=II", data, attr + 4)
                    elif what == _UNIX_DIAG_RQLEN:
                        queued = struct.unpack_from("=I", data, attr + 4)[0]
                    attr += (size + 3) & ~3
                if vfs is not None:
                    found.append(((vfs[0], vfs[1]), queued))
                at += (length + 3) & ~3


# -- TCP ports of this host: /proc/net/tcp --------------------------------------------------


if TYPE_CHECKING:
    import ipaddress


def _local(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses ``host`` names when it is this host's (an address literal one can
    bind, or ``localhost``); None otherwise (no name is looked up)."""
    import ipaddress
    import socket

    names = ["127.0.0.1", "::1"] if host == "localhost" else [host.strip("[]")]
    try:
        addresses = [ipaddress.ip_address(n) for n in names]
    except ValueError:
        return None
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((str(address), 0))
            except OSError:
                return None
    return addresses


def _tcp_waiting(host_port: str) -> bool | None:
    import ipaddress

    host, port = host_port.rsplit(":", 1)
    addresses = _local(host)
    if addresses is None:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            where, _, hexport = local.partition(":")
            if state != "0A" or int(hexport, 16) != int(port):
                continue
            raw = bytes.fromhex(where)
            bound = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            mapped = [a.ipv4_mapped for a in [bound] if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped]
            if bound.is_unspecified or bound in addresses or any(m in addresses for m in mapped):
                with contextlib.suppress(ValueError):
                    return int(queues.split(":")[1], 16) > 0  # a listener's rx_queue: its accept queue
    return None
