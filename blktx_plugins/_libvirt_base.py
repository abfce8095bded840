"""The low level of the ``libvirt`` plugin: the module imported on first use, XML read
with expat, connections (one kept per embedded driver), calls run at once in threads,
a domain's state and disks, snapshots found by name and owned by token.

:mod:`blktx_plugins.libvirt` builds the action types and hooks on these, and
:mod:`blktx_plugins._libvirt_catalog` the group-snapshot types.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from blktx import ActionFailed, Refused

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET


def _load() -> Any:
    """libvirt-python, or None when it is not installed (reported at check)."""
    try:
        import libvirt as module
    except ImportError:  # pragma: no cover - reported at check
        return None
    return module


class _Lazy:
    """``libvirt``, imported on first use: 15 ms at every start of blktx otherwise
    (``blktx types``, ``check`` of a spec without libvirt actions)."""

    def __getattr__(self, name: str) -> Any:
        module = _load()
        if module is None:
            raise ImportError("libvirt-python is not installed: pip install 'blktx[libvirt]'")
        return getattr(module, name)


libvirt: Any = _Lazy()


def xml(text: str) -> ET.Element:
    """Parse libvirt's XML (ElementTree imported on first use)."""
    import xml.etree.ElementTree as ElementTree

    return ElementTree.fromstring(text)


def _expat() -> Any:
    """An expat parser naming elements as ElementTree does (``uri}local`` in a
    namespace, so no namespaced element passes for a plain one). What a run reads of
    libvirt's XML (the disks, a snapshot's creation time) needs no tree: ElementTree's
    import was 2-3 ms of every run, expat's is 1."""
    from xml.parsers import expat

    return expat.ParserCreate(namespace_separator="}")


def disk_map(text: str) -> dict[str, str]:
    """Each writable disk of a domain's XML (target dev -> its active image, or ``""``):
    every ``/domain/devices/disk`` of device ``disk`` (the default) with a ``target``
    and no ``readonly`` child; its image from its first ``source`` child (``file``,
    else ``dev``), never from a ``backingStore``'s."""
    out: dict[str, str] = {}
    depth = 0
    disk: dict[str, Any] | None = None  # the disk element being read: its facts so far
    parser = _expat()

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth, disk
        depth += 1
        if depth == 2:
            disk = {"devices": name == "devices"}
        elif depth == 3 and disk is not None and disk["devices"] and name == "disk":
            disk = {"devices": True, "disk": attrs.get("device", "disk") == "disk"}
        elif depth == 4 and disk is not None and "disk" in disk and name in ("target", "source", "readonly"):
            disk.setdefault(name, attrs)

    def end(_name: str) -> None:
        nonlocal depth, disk
        if depth == 3 and disk is not None and "disk" in disk:
            target, source = disk.get("target"), disk.get("source")
            if disk["disk"] and target is not None and "readonly" not in disk:
                out[str(target.get("dev"))] = "" if source is None else (source.get("file") or source.get("dev") or "")
            disk = {"devices": True}
        depth -= 1

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.Parse(text, True)
    return out


def creation_time(text: str) -> str | None:
    """``findtext("creationTime")`` of a snapshot's XML, as ElementTree answers it:
    the text of the root's first ``creationTime`` child up to its own first child;
    ``""`` when it has none, None when there is no such child."""
    depth, state = 0, "before"  # before, inside (reading its text), after
    got: list[str] = []
    parser = _expat()

    def start(name: str, _attrs: dict[str, str]) -> None:
        nonlocal depth, state
        depth += 1
        if state == "before" and depth == 2 and name == "creationTime":
            state = "inside"
        elif state == "inside":
            state = "after"  # a child: ElementTree's text ends here

    def end(_name: str) -> None:
        nonlocal depth, state
        if state == "inside" and depth == 2:
            state = "after"
        depth -= 1

    def data(chunk: str) -> None:
        if state == "inside":
            got.append(chunk)

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, data
    parser.Parse(text, True)
    return None if state == "before" else "".join(got)


def escape(text: str) -> str:
    """``text`` as XML character data."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def quoteattr(text: str) -> str:
    """``text`` as a quoted XML attribute value."""
    return '"' + escape(text).replace('"', "&quot;") + '"'


T = TypeVar("T")


DEFAULT_URI = "qemu:///system"


#: libvirt deletes (merges back) external snapshots from 9.0 on: the undo needs it.
DELETE_EXTERNAL = 9_000_000


#: libvirt reverts to external snapshots from 9.9 on.
REVERT_EXTERNAL = 9_009_000


#: URI parameters that choose how to reach a host, not which host or driver it is.
_TRANSPORT_PARAMS = {
    "keyfile",
    "no_verify",
    "no_tty",
    "known_hosts",
    "known_hosts_verify",
    "sshauth",
    "pkipath",
    "command",
    "netcat",
    "proxy",
    "mode",
    "tls_priority",
    "name",
}


PAUSE, FREEZE = "libvirt.pause", "libvirt.freeze"


#: Seconds kept free at the end of a quiesce window for the rollback and the resumes.
RESERVE = 0.5


#: The longest an ordinary libvirt call (outside a window) may take.
CALL_TIMEOUT = 300.0


_loop_lock = threading.Lock()


_loop_ready = False


#: The process's one connection to each embedded driver (``qemu:///embed?root=DIR``).
_embedded: dict[str, Any] = {}


def version_text(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _need_libvirt() -> Any:
    if _load() is None:
        raise Refused(
            "the libvirt action types need the Python module libvirt (libvirt-python)",
            hint="pip install 'blktx[libvirt]' (it builds against libvirt-dev and pkg-config)",
        )
    return libvirt


def event_loop() -> None:
    """libvirt's default event loop, registered once per process and run in a daemon
    thread: the embedded driver and connection keepalives need one. Also silences
    libvirt's own printing of errors (blktx reports them)."""
    global _loop_ready
    lv = _need_libvirt()
    with _loop_lock:
        if _loop_ready:
            return
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=run, name="blktx-libvirt-events", daemon=True).start()
        _loop_ready = True


def open_connection(uri: str) -> Any:
    """A read-write connection to ``uri`` (with libvirt's event loop running)."""
    event_loop()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ActionFailed(f"cannot connect to libvirt at {uri}: {_msg(exc)}") from None


def _msg(exc: BaseException) -> str:
    if libvirt is not None and isinstance(exc, libvirt.libvirtError):
        return str(exc.get_error_message() or exc)
    return str(exc)


def uri_key(uri: str) -> str:
    """``uri`` without the parameters that only say how to reach the host: one
    domain reached with two key files is one target."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _TRANSPORT_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def embedded(uri: str) -> bool:
    """Whether ``uri`` names a driver embedded in this process (``qemu:///embed?root=DIR``)."""
    parts = urlsplit(uri)
    return not parts.netloc and parts.path.rstrip("/") == "/embed"


def _embedded_connection(uri: str) -> Any:
    """The process's one connection to the embedded driver at ``uri``, opened once and
    kept: libvirt (9.0) registers the embedded driver anew at every open, and the 16th
    open in one process fails ("Too many drivers, cannot register QEMU"), so a process
    that ran 15 transactions could run no more. The driver lives in this process
    anyway; the connection ends with it."""
    with _loop_lock:
        conn = _embedded.get(uri)
    if conn is not None:
        try:
            if conn.isAlive():
                return conn
        except libvirt.libvirtError:
            pass
    conn = open_connection(uri)
    with _loop_lock:
        if not _embedded:  # closed before the interpreter tears libvirt's module down
            atexit.register(_close_embedded)
        _embedded.setdefault(uri, conn)
        if _embedded[uri] is not conn:  # another thread opened it meanwhile
            conn.close()
        return _embedded[uri]


def _close_embedded() -> None:
    with _loop_lock:
        conns = list(_embedded.values())
        _embedded.clear()
    for conn in conns:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - the process is ending
            pass


def uuid_like(ref: str) -> bool:
    """Whether ``uuid.UUID(ref)`` would accept ``ref`` (hyphens, braces, a ``urn:uuid:``
    prefix), judged as it judges, without importing ``uuid``: it imports ``platform``,
    2.4 ms of every run."""
    digits = ref.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
    if len(digits) != 32:
        return False
    try:
        return 0 <= int(digits, 16) < 1 << 128
    except ValueError:
        return False


#: The most calls of one step that run at once (the others wait for a free slot).
MAX_AT_ONCE = 32


class _Call:
    """A call in a thread of its own; once ``done`` is set, its ``value`` or ``error``.
    (Not ``concurrent.futures``: its import was 3 ms of every run.) The thread is not
    a daemon: the process's exit waits for a libvirt call under way, as it waited for
    a pool's workers."""

    def __init__(self, call: Callable[[], Any], slots: threading.Semaphore, name: str) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self._call, self._slots = call, slots
        threading.Thread(target=self._run, name=name).start()

    def _run(self) -> None:
        try:
            with self._slots:
                self.value = self._call()
        except BaseException as exc:  # noqa: BLE001 - the caller's to judge, as a future's would be
            self.error = exc
        finally:
            self.done.set()


def _all_at_once(
    calls: Sequence[Callable[[], T]], timeout: float, pending: dict[int, _Call] | None = None, keys: Sequence[int] = ()
) -> list[T | BaseException]:
    """Run every call in its own thread at once (at most ``MAX_AT_ONCE`` at a time);
    each result or exception, in order. A call still running after ``timeout`` gives a
    :class:`TimeoutError` (it goes on in its thread: ``pending`` keeps it under its
    key, for a cancel to wait)."""
    if not calls:
        return []
    slots = threading.Semaphore(MAX_AT_ONCE)
    running = [_Call(c, slots, f"blktx-libvirt-{n}") for n, c in enumerate(calls)]
    deadline = time.monotonic() + timeout
    for call in running:
        call.done.wait(max(0.0, deadline - time.monotonic()))
    out: list[T | BaseException] = []
    for n, call in enumerate(running):
        if not call.done.is_set():
            if pending is not None and keys:
                pending[keys[n]] = call
            out.append(TimeoutError(f"libvirt did not answer within {timeout:.2f} s"))
        elif call.error is not None:
            out.append(call.error)
        else:
            out.append(call.value)
    return out


def _domain_state(dom: Any) -> str:
    state = dom.state()[0]
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return "running"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return "paused"
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        return "shutoff"
    return {libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended"}.get(
        state, f"state {state}"
    )


def disks(dom: Any) -> dict[str, str]:
    """Each writable disk of the domain (target dev -> its active image, or ``""``)."""
    return disk_map(dom.XMLDesc(0))


def agent_state(dom: Any) -> str | None:
    """The guest agent channel's state (``connected``, ``disconnected``), or None
    when the domain has no guest agent channel."""
    for target in xml(dom.XMLDesc(0)).findall("./devices/channel/target"):
        if target.get("name") == "org.qemu.guest_agent.0":
            return target.get("state") or "unknown"
    return None


def _ours(snap: Any, token: str) -> bool:
    desc = xml(snap.getXMLDesc(0)).findtext("description") or ""
    return token in desc.split()


def _find(dom: Any, name: str) -> Any | None:
    try:
        return dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return None
        raise
