"""What the QEMU plugins share: reading qcow2 headers, finding who holds an image,
running ``qemu-img``, and a ``qemu-storage-daemon`` driven over QMP.

Reading the header directly makes ``check`` cheap and free of side effects: no
process is started and the image is opened read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio

from blktx import ActionFailed, Refused
from blktx_plugins._fs import Private
from blktx_plugins._image import QCOW2_MAGIC, Header, check_chain, open_image, open_verified, read_image
from blktx_plugins._qcow2_format import write_overlay

# QEMU's image locking takes OFD locks on bytes 100.. (permissions held) and
# 200.. (permissions not shared) of an image it has open.
_LOCK_START, _LOCK_LEN = 100, 200

T = TypeVar("T")


def holder(path: str) -> str | None:
    """Who has ``path`` open under QEMU's image locking, or None when nobody does."""
    try:
        # non-blocking: a FIFO put in place of an image must not hang the check
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_START, _LOCK_LEN, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        l_type = struct.unpack("hhqqi4x", got)[0]
    finally:
        os.close(fd)
    if l_type == fcntl.F_UNLCK:
        return None
    return _process_with(path) or "another process (QEMU image lock is held)"


def _process_with(path: str) -> str | None:
    real = os.path.realpath(path)
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") == real:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        argv0 = fh.read().split(b"\0")[0].decode(errors="replace")
                    return f"{os.path.basename(argv0)} (pid {pid})"
        except OSError:
            continue
    return None


def check_writable_image(path: str, roots: list[str], read: Header | BaseException | None = None) -> Header:
    """Refuse an image that is missing, not qcow2, read-only, in use, or whose chain
    leaves the roots (:func:`~blktx_plugins._image.check_chain`); return its header.
    ``read``: its header (or why it could not be read) from a batch read of many."""
    if isinstance(read, BaseException):
        raise read
    header = check_chain(path, roots, read)
    if not os.access(path, os.W_OK):
        raise Refused(f"{path} is not writable", hint="check its permissions")
    who = holder(path)
    if who:
        raise Refused(
            f"{path} is in use by {who}", hint="snapshot a running VM's drives with the qmp.* actions, or shut it down first"
        )
    return header


def image_format(path: str) -> tuple[str, int, list[int]]:
    """``path``'s format as QEMU would probe it (``qcow2`` or ``raw``: a caller has
    refused the rest with ``check_chain``), its virtual size and identity, read by
    blktx itself rather than by ``qemu-img info``."""
    fd = open_image(path)
    try:
        st = os.fstat(fd)
        if os.pread(fd, 4, 0) != QCOW2_MAGIC:
            return "raw", st.st_size, [st.st_dev, st.st_ino]
    finally:
        os.close(fd)
    header = read_image(path)
    return "qcow2", header.size, header.ident


def backing_name(overlay: str, backing: str) -> str:
    """How an overlay names its backing file: relative to the overlay's folder (a
    folder of images stays movable) and starting with ``./`` or ``/``, so that no
    folder name (``json:{...}``, ``nbd:...``) can be read by QEMU as a protocol."""
    rel = os.path.relpath(backing, os.path.realpath(os.path.dirname(os.path.abspath(overlay))))
    return rel if rel.startswith("/") else "./" + rel


def create_overlay(private: Private, overlay: str, backing: str, fmt: str, size: int, relative: bool = True) -> None:
    """Write a qcow2 overlay of ``backing`` into the unpublished file ``private``.

    The caller records ``private.ident`` (journaled with ``ctx.remember``) and then
    publishes it at ``overlay`` (:func:`~blktx_plugins._fs.publish`), so that a
    cancel removes the overlay only when it is that very file. The backing file is
    not opened (its format and ``size`` are given): the overlay is written through
    its descriptor and made durable (:func:`~blktx_plugins._qcow2_format.write_overlay`). ``relative``: name the backing file by
    :func:`backing_name`; a running VM's node needs the absolute name it opened.
    """
    name = backing_name(overlay, backing) if relative else backing
    if not name.startswith(("/", "./")):
        raise ActionFailed(f"{overlay}: backing name {name!r} is neither absolute nor ./-relative")
    try:
        # written directly and made durable: no process per overlay (blktx_plugins._qcow2_format)
        write_overlay(private.fd, name, fmt, size)
    except ValueError:  # what only qemu-img knows how to write (an odd size, a long name): let it say
        qemu_img("create", "-q", "-f", "qcow2", "-b", name, "-F", fmt, "-u", private.path, str(size), pass_fds=(private.fd,))


def qemu_img(*args: str, timeout: float = 120, pass_fds: tuple[int, ...] = ()) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ActionFailed("qemu-img is not installed (Debian package qemu-utils)")
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False, pass_fds=pass_fds)
    if out.returncode != 0:
        raise ActionFailed(f"qemu-img {args[0]}: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def die_with_parent(parent: int, nofile: int | None = None) -> Any:
    """A ``preexec_fn``: the child gets SIGKILL when blktx dies, so that a killed run
    never leaves a daemon holding the images' locks (``blktx recover`` needs them).
    ``nofile``: the child's soft limit of open files is raised to it (at most the
    hard limit: always allowed), as a daemon opens two descriptors per image.

    Everything the child calls is looked up here, in the parent: between fork and
    exec the child must not load a library or import a module (another thread of
    blktx may have held the loader's or the import lock at the fork)."""
    import ctypes
    import resource

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig, sigkill, getppid, exit_now = 1, signal.SIGKILL, os.getppid, os._exit
    setrlimit, getrlimit, rlimit_nofile = resource.setrlimit, resource.getrlimit, resource.RLIMIT_NOFILE

    def arm() -> None:
        prctl(pr_set_pdeathsig, sigkill)
        if getppid() != parent:  # blktx died between fork and prctl
            exit_now(1)
        if nofile is not None:
            try:
                setrlimit(rlimit_nofile, (nofile, getrlimit(rlimit_nofile)[1]))
            except (OSError, ValueError):
                pass  # the daemon keeps the parent's limit; batches were sized for the raised one

    return arm


def child_nofile() -> int:
    """The soft limit of open files a storage daemon gets: the hard limit, capped by
    the kernel's ``fs.nr_open`` (a soft limit may always be raised that far)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            nr_open = int(fh.read())
    except (OSError, ValueError):
        nr_open = 1 << 20
    top = nr_open if hard == resource.RLIM_INFINITY else min(hard, nr_open)
    return max(soft, top)


# qemu.qmp logs every refused connection at ERROR; blktx reports them itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class VmGone(ActionFailed):
    """The VM's QMP socket is gone: QEMU died."""


class _Loop:
    """The process's one asyncio loop for every QMP and guest-agent connection, run
    by a daemon thread: commands to many VMs go out together from one loop, not from
    one thread and loop per VM."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid = 0

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        import asyncio

        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():  # a forked child has no loop thread
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="blktx-qmp-loop", daemon=True).start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


def run_async(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    import asyncio

    """Run ``coro`` on the shared QMP loop and wait for it (from any thread but the loop's)."""
    if timeout is not None:
        coro = asyncio.wait_for(coro, timeout)
    return asyncio.run_coroutine_threadsafe(coro, _Loop.get()).result()


class Qmp:
    """A QMP connection (``qemu.qmp``), usable from any thread.

    :meth:`cmd` waits for one command; :meth:`execute` is the same as a coroutine,
    for sending to many VMs at once with :func:`run_async` and ``asyncio.gather``.
    QEMU's errors become :class:`ActionFailed` naming the peer and the command; a
    closed, reset or silent connection becomes :class:`VmGone`.
    """

    #: How error messages name the peer.
    what = "VM"
    #: QEMU's guest agent sends no greeting and negotiates nothing.
    negotiate = True

    def __init__(self, address: str, timeout: float = 10.0, *, connect: bool = True) -> None:
        """Connect now; with ``connect=False`` later, by ``await conn.open()``."""
        self.address = address
        self.timeout = timeout
        self._client: Any = None
        if connect:
            run_async(self.open(), None)

    @classmethod
    def open_many(cls, addresses: list[str], timeout: float = 10.0) -> dict[str, Qmp | VmGone]:
        """Connect to every address at once: each one's connection, or why it failed."""
        import asyncio

        conns = [cls(a, timeout, connect=False) for a in addresses]

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(c.open() for c in conns), return_exceptions=True)

        got = run_async(all_of())
        return {c.address: (c if r is None else r) for c, r in zip(conns, got, strict=True)}

    async def open(self) -> None:
        import asyncio

        from qemu.qmp import QMPClient

        target: Any = self.address
        if self.address.startswith("tcp:"):
            host, port = self.address[4:].rsplit(":", 1)
            target = (host, int(port))
        client = QMPClient("blktx")
        client.await_greeting = client.negotiate = self.negotiate
        try:
            await asyncio.wait_for(client.connect(target), self.timeout)
        except Exception as exc:  # noqa: BLE001 - qemu.qmp raises its own connection errors
            with contextlib.suppress(Exception):
                await client.disconnect()
            why = "timed out (another client holds it?)" if isinstance(exc, TimeoutError) else str(exc)
            raise VmGone(f"cannot connect to the {self.what}'s socket {self.address}: {why}") from None
        self._client = client

    async def execute(self, name: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        import asyncio

        from qemu.qmp import ExecuteError, Runstate

        if self._client is not None and self._client.runstate != Runstate.RUNNING:
            # Lost before this command was sent (the watchdog severed a stopped run, the
            # peer closed): nothing of it reached the peer, so a fresh connection is safe.
            await self.disconnect()
            await self.open()
        try:
            return await asyncio.wait_for(self._client.execute(name, args), timeout)
        except ExecuteError as exc:
            raise ActionFailed(f"{self.what} {self.address}: {name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - EOF, a reset or a timeout: the peer is gone or hung
            raise VmGone(f"{self.what} {self.address} stopped answering during {name}: {exc or type(exc).__name__}") from None

    def event_time(self, name: str) -> float | None:
        """When QEMU says the event ``name`` (``STOP``, ``RESUME``) last happened, as
        ``time.monotonic()`` seconds, from the events received since the last call
        (which are consumed); None when none came. Call it on the QMP loop."""
        if self._client is None:
            return None
        stamps = [e.get("timestamp", {}) for e in self._client.events.clear() if e.get("event") == name]
        if not stamps:
            return None
        wall = stamps[-1].get("seconds", 0) + stamps[-1].get("microseconds", 0) / 1e6
        return float(wall - (time.time() - time.monotonic()))

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        return run_async(self.execute(name, args, timeout))

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def disconnect(self) -> None:
        import asyncio

        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a dead connection
                await asyncio.wait_for(client.disconnect(), 5)

    def close(self) -> None:
        if self._client is not None:
            run_async(self.disconnect())


class Agent(Qmp):
    """A connection to QEMU's guest agent (``qemu-ga``): the host end of the VM's
    agent channel, a unix socket or tcp:host:port. The agent sends no greeting and
    negotiates nothing; a ``guest-sync`` with a fresh id first skips whatever an
    earlier client left in the channel."""

    what = "guest agent"
    negotiate = False

    async def open(self) -> None:
        await super().open()
        token = int.from_bytes(os.urandom(4), "big") >> 1  # not secrets: hmac and hashlib cost every start ~3 ms
        got = await self.execute("guest-sync", {"id": token}, timeout=self.timeout)
        if got != token:
            raise VmGone(f"guest agent {self.address} answered guest-sync with {got!r}, not {token}")


def gather(calls: list[tuple[Qmp, str, dict[str, Any] | None]], timeout: float = 120.0) -> list[Any]:
    """Send one command to each of many connections at once; each call's reply, or
    its exception (:class:`ActionFailed` or :class:`VmGone`, also when it took more
    than ``timeout`` seconds) in its place. No calls: no asyncio imported (~15 ms)."""
    if not calls:
        return []
    import asyncio

    async def all_of() -> list[Any]:
        return await asyncio.gather(*(c.execute(n, a, timeout) for c, n, a in calls), return_exceptions=True)

    return run_async(all_of())


def qsd_prefix(txid: str) -> str:
    """How the temporary folders of a run's storage daemons begin."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in txid)
    return f"blktx-qsd-{safe}-" if safe else "blktx-qsd-"


def remove_daemon_folders(txid: str) -> list[str]:
    """Remove the temporary folders that the run ``txid``'s storage daemons left;
    return them. Only what is provably blktx's: named for that transaction, a real
    folder (not a symlink) owned by this user. Idempotent."""
    if not txid:
        return []
    prefix, top = qsd_prefix(txid), tempfile.gettempdir()
    removed = []
    for name in os.listdir(top):
        if not name.startswith(prefix):
            continue
        path = os.path.join(top, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path)
            removed.append(path)
    return removed


#: How often a live daemon's heartbeat file is touched, and how late a touch may be
#: (a busy machine, the filesystem's clock) before a kill's moment is mis-bounded.
HEARTBEAT_INTERVAL = 0.1
HEARTBEAT_MARGIN = 0.5


class Heartbeat:
    """A file whose mtime blktx sets to the wall-clock time every
    :data:`HEARTBEAT_INTERVAL` seconds while ``alive()`` says so, from a thread.

    Its last mtime bounds from above the moment a killed run's daemon released its
    image locks: a run alive at that mtime would have touched it again an interval
    later, and the daemon dies with the run (``PR_SET_PDEATHSIG``). :meth:`stop` is
    called after the daemon has exited and stamps that moment last.
    """

    def __init__(self, path: str, alive: Any) -> None:
        self.path = path
        self._alive = alive
        self._stop = threading.Event()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="blktx-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        now = time.time_ns()  # exact: the filesystem's own clock is coarse (a tick behind)
        with contextlib.suppress(OSError):
            os.utime(self.path, ns=(now, now), follow_symlinks=False)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            if self._alive():
                self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._beat()


def heartbeat_bound(path: str) -> float | None:
    """The latest wall-clock time a killed run's daemon can have held its images'
    locks, from its heartbeat file ``path`` (as journaled); None when that cannot be
    known: the file is gone (``/tmp`` cleared at boot) or not provably blktx's (its
    folder must be a real ``blktx-qsd-*`` folder owned by this user and writable by
    nobody else, the file a regular file of this user)."""
    folder = os.path.dirname(path)
    if not os.path.basename(folder).startswith(qsd_prefix("")):
        return None
    try:
        dst, fst = os.lstat(folder), os.lstat(path)
    except OSError:
        return None
    if not (stat.S_ISDIR(dst.st_mode) and dst.st_uid == os.getuid() and not dst.st_mode & 0o022):
        return None
    if not (stat.S_ISREG(fst.st_mode) and fst.st_uid == os.getuid()):
        return None
    return fst.st_mtime_ns / 1e9 + HEARTBEAT_INTERVAL + HEARTBEAT_MARGIN


class StorageDaemon:
    """One ``qemu-storage-daemon`` with every image of a batch open, driven over QMP.

    Images are opened on the command line (faster than one ``blockdev-add`` each);
    ``node[image]`` is an image's node name. :meth:`close` quits the daemon, which
    flushes and unlocks the images. ``heartbeat`` is the file touched while it runs
    (:class:`Heartbeat`). Several may be started at once from threads
    (:mod:`blktx_plugins._daemons`): blktx holds a batch's descriptors only while
    that daemon is spawned, one spawn at a time. The daemon's output goes to a file
    in its folder; when it dies, the error says what it printed.
    """

    _spawn = threading.Lock()

    def __init__(
        self, images: list[str], txid: str = "", idents: dict[str, list[int]] | None = None, *, wait: bool = True
    ) -> None:
        """Spawn the daemon and (``wait``) :meth:`ready` it. It dies with the thread
        that spawned it (``PR_SET_PDEATHSIG`` follows the thread): spawn from one that
        outlives it."""
        self.node = {image: f"n{i}" for i, image in enumerate(images)}
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise ActionFailed("qemu-storage-daemon is not installed (Debian package qemu-system-common)")
        # Named after the transaction: a SIGKILLed run cannot remove it, and blktx
        # recover's blktx_cleanup finds the dead run's folders by that name.
        self._dir = tempfile.mkdtemp(prefix=qsd_prefix(txid))
        self.heartbeat = os.path.join(self._dir, "heartbeat")
        self._log = os.path.join(self._dir, "output")
        self._fds: dict[int, str] = {}
        self._sock = os.path.join(self._dir, "qmp.sock")
        try:
            self._proc = self._start(exe, self._sock, images, idents or {})
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until the daemon listens and connect to it; if it exits first, raise
        :class:`ActionFailed` with what it printed."""
        sock = self._sock
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self._proc.poll() is not None:
                msg = self.output()
                shutil.rmtree(self._dir, ignore_errors=True)
                raise ActionFailed(f"qemu-storage-daemon exited at start: {msg or 'it printed nothing'}")
            if time.monotonic() > deadline:
                self._proc.kill()
                self._proc.wait()
                shutil.rmtree(self._dir, ignore_errors=True)
                raise ActionFailed("qemu-storage-daemon did not start in 30 s")
            time.sleep(0.001)
        # The socket file appears at bind(), a moment before listen(): retry refusals.
        while True:
            try:
                self._qmp = Qmp(sock)
                break
            except VmGone as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._proc.kill()
                    self._proc.wait()
                    why = self.output()
                    shutil.rmtree(self._dir, ignore_errors=True)
                    raise ActionFailed(
                        f"qemu-storage-daemon exited at start: {why}" if why else f"qemu-storage-daemon: {exc}"
                    ) from None
                time.sleep(0.002)
        # Beating from before any caller records its start until after the daemon exits.
        self._beat = Heartbeat(self.heartbeat, lambda: self._proc.poll() is None)

    def _start(self, exe: str, sock: str, images: list[str], idents: dict[str, list[int]]) -> subprocess.Popen[bytes]:
        # The daemon opens each image through a descriptor blktx opened and checked
        # (the identity the check recorded, never a symlink or a FIFO), not by its
        # path: a folder swapped since the check cannot redirect it. Its backing
        # chain is not opened at all (backing: null): internal snapshots need none.
        argv = [exe, "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0"]
        with self._spawn:  # a batch's descriptors are open in blktx only while it is spawned
            fds: list[int] = []
            try:
                for image in images:
                    fds.append(open_verified(image, idents.get(image)))
                for i, fd in enumerate(fds):
                    argv += [
                        "--blockdev",
                        json.dumps(
                            {
                                "driver": "qcow2",
                                "node-name": f"n{i}",
                                "backing": None,
                                "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"},
                            }
                        ),
                    ]
                self._fds = dict(zip(fds, images, strict=True))
                log = os.open(self._log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    return subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=fds,
                        preexec_fn=die_with_parent(os.getpid(), child_nofile()),
                    )
                finally:
                    os.close(log)
            finally:
                for fd in fds:
                    os.close(fd)

    def output(self, wait: float = 1.0) -> str:
        """What the daemon printed (its last 2,000 characters), images named by path,
        once it has exited (waiting up to ``wait`` s); "" while it runs."""
        try:
            self._proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return ""
        try:
            with open(self._log, errors="replace") as fh:
                msg = fh.read()[-2000:].strip()
        except OSError:
            return ""
        for fd, image in self._fds.items():  # name the images, not their descriptors
            msg = msg.replace(f"/proc/self/fd/{fd}", image)
        return msg

    def named(self, exc: ActionFailed) -> ActionFailed:
        """``exc`` from this daemon's connection, named as the daemon (the same kind:
        :class:`VmGone` when it died), with what it printed if it died."""
        msg = str(exc).replace(f"VM {self._qmp.address}", "qemu-storage-daemon", 1)
        if isinstance(exc, VmGone):
            why = self.output()
            code = self._proc.returncode
            if code is not None:
                msg += f" (it exited with status {code}{': ' + why if why else ''})"
        return type(exc)(msg)

    async def execute(self, name: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        """One command, as a coroutine on the shared QMP loop (errors as QMP's: pass
        them through :meth:`named` outside the loop)."""
        return await self._qmp.execute(name, args, timeout)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return self._qmp.cmd(name, args)
        except ActionFailed as exc:
            raise self.named(exc) from None

    def close(self) -> None:
        try:
            self._qmp.cmd("quit")
        except ActionFailed:
            pass  # the daemon is killed below if quit did not work
        self._qmp.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._beat.stop()  # its last stamp is after the locks were released
        shutil.rmtree(self._dir, ignore_errors=True)
