"""The dead-man switch: a process that ends every quiesce hold when the run that
took them dies or stops making progress.

A run with a quiesce mode and a journal starts :class:`Watchdog` before anything
is paused. The watchdog process lives in its own session (a kill of the run's
process group does not reach it) and listens on a pipe whose write end only the
run holds:

- ``o``: a quiesce window opened (its budget, ``max_window``, starts now);
- ``c``: the window closed (every hold resumed by the run itself);
- ``d``: the run is done with the watchdog; it exits.

End of file before ``d`` means the run died (the kernel closed its end of the
pipe): the watchdog acts at once. A window open past its budget plus a grace
period means the run hangs or was stopped: the watchdog fences it first, then
*severs* it: a stopped run still holds the VMs' monitor connections (a QEMU
monitor serves one client), so the watchdog takes a copy of each of the run's
sockets (``pidfd_getfd(2)``, as root) and shuts it down; QEMU sees its client gone
and accepts the watchdog's own connection. The run itself is left alive: when it
wakes, its connections are closed and its commit write is refused, so it rolls
back (exit 1, or 3 when a cancel cannot finish) and ``blktx recover`` ends it.
Only where the kernel refuses ``pidfd_getfd`` is the run killed instead.

To act is to *fence* the transaction in the journal — its commit write is refused
from then on, so the group is never committed with a point in time that was not
held — unless the commit is already durable, then to resume every hold the
journal lists as not resumed (newest first, through the plugins' own
``blktx_resume`` hooks) and record that. ``blktx recover`` finishes the rest.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time

# The watchdog process imports only what watching needs; the rest when it acts (its
# start-up is on the run's way to its window). TYPE_CHECKING without typing's import.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import IO, Any, NoReturn

#: Seconds past ``max_window`` before the watchdog takes over a run that is alive
#: but stuck: the run's own budget check gets the first chance to roll back. Public:
#: a plugin bounding its resumes by ``ctx.window_deadline`` keeps under it.
GRACE = 1.0

#: The watchdog process loads this file alone, without ``site`` (``-S``) or the blktx
#: package: ~30 ms of CPU instead of ~100; ``_site`` loads the rest when it must act.
#: It is started just before the quiesce window, and the window opens only once it is
#: watching (at most ``READY_WAIT`` s later): on a small machine its start-up ran beside
#: the window and slowed what ran in it (one libvirt domain's snapshot: 46 ms instead
#: of 33, on 2 cores).
#: ``importlib.machinery`` and not ``importlib.util`` (contextlib, enum: 3.5 ms more);
#: the loader reads the file's own ``__pycache__`` entry, as an import of it would.
_BOOT = (
    "import sys, importlib.machinery as im; l = im.SourceFileLoader('blktx_watchdog_boot', sys.argv[1]); "
    "m = type(sys)(l.name); m.__file__, m.__loader__ = l.path, l; sys.modules[l.name] = m; l.exec_module(m); "
    "m.end(m.main(sys.argv[2:]))"
)
#: The longest a window waits for its watchdog to be watching.
READY_WAIT = 2.0


class Watchdog:
    """The run's end of the dead-man switch."""

    def __init__(self, journal: str, txid: str, budget: float) -> None:
        import subprocess

        read, self._write = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "BLKTX_CRASH_AFTER"}  # drills kill the run, not this
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [
                sys.executable,
                "-S",  # site and blktx are imported only if it must act (_site)
                "-c",
                _BOOT,
                os.path.abspath(__file__),
                "--journal",
                journal,
                "--txid",
                txid,
                "--budget",
                str(budget),
                "--pid",
                str(os.getpid()),
                "--ready",
            ],
            stdin=read,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=env,
            close_fds=True,
        )
        os.close(read)
        os.set_inheritable(self._write, False)
        self._ready = self.proc.stdout

    def _wait_ready(self) -> None:
        """Wait until the watchdog says it is watching (at most ``READY_WAIT`` s: then go
        on, it will still read what the run sends)."""
        ready, self._ready = self._ready, None
        if ready is None:
            return
        with ready:
            if select.select([ready], [], [], READY_WAIT)[0]:
                os.read(ready.fileno(), 1)  # its byte, or end of file if it died: go on either way

    def _send(self, what: bytes) -> None:
        try:
            os.write(self._write, what)
        except OSError:
            pass  # the watchdog is gone: it can do no more for this run

    def window_opened(self) -> None:
        self._wait_ready()
        self._send(b"o")

    def window_closed(self) -> None:
        self._send(b"c")

    def stop(self) -> None:
        """The run ended normally: the watchdog exits without acting."""
        import subprocess

        self._send(b"d")
        os.close(self._write)
        if self._ready is not None:
            self._ready.close()
            self._ready = None
        _exited(self.proc.pid, 5.0)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _exited(pid: int, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until the child ``pid`` has exited, woken the moment it
    does (a pidfd): ``Popen.wait(timeout)`` polls with growing sleeps, and found a
    watchdog that took 1 ms to exit only 5-7 ms later, on the run's way to its exit."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3: Popen.wait's polling
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def watch(stream: IO[bytes], budget: float, pid: int) -> str | None:
    """Wait on the run; return why the watchdog must act, or None when the run said done."""
    opened: float | None = None
    fd = stream.fileno()
    while True:
        timeout = None if opened is None else max(0.0, opened + budget + GRACE - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return OVERRAN + f"the run (pid {pid}) held its quiesce window past {budget:g} s + {GRACE:g} s"
        data = os.read(fd, 64)
        if not data:
            return f"the run (pid {pid}) died inside its quiesce window"
        for byte in data:
            if byte == ord("o"):
                opened = time.monotonic()
            elif byte == ord("c"):
                opened = None
            elif byte == ord("d"):
                return None


#: How ``watch`` marks a run that is alive but overran (it must be fenced and severed first).
OVERRAN = "overran: "
_PIDFD_GETFD = 438  # x86_64, aarch64 and every architecture using the generic table


def sever(pid: int) -> str:
    """Shut down every socket of the run ``pid`` (monitors, agents, database sessions)
    through copies taken with ``pidfd_getfd(2)``: their peers see the run gone and
    take new clients. Kills the run instead when the kernel refuses; says which."""
    import ctypes
    import signal
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return "it was already gone"
    severed = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                    os.kill(pid, signal.SIGKILL)
                    return f"it was killed (pidfd_getfd: {os.strerror(ctypes.get_errno())})"
                continue  # closed meanwhile
            with socket.socket(fileno=fd) as sock:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    severed += 1
                except OSError:
                    pass  # not connected (a listener): nothing held through it
    except FileNotFoundError:
        return "it was already gone"
    finally:
        os.close(pidfd)
    return f"its {severed} connection(s) were shut down; it rolls back when it runs again"


def _site() -> None:
    """What the watchdog's start left out (``-S``): site-packages (blktx's plugins,
    pluggy, libvirt), before any of blktx is imported."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def take_over(journal_path: str, txid: str, why: str) -> list[str]:
    """Fence ``txid`` and resume every hold the journal lists as not resumed."""
    _site()
    from blktx.context import Options, RunContext, spec_options
    from blktx.events import Hold
    from blktx.journal import SqliteJournal
    from blktx.plugins import default_registry
    from blktx.states import TxState
    from blktx.transaction import TransactionRun

    journal = SqliteJournal(journal_path)
    notes = []
    # Resume first, then write: the run is dead (or killed) already, so it cannot
    # commit in between, and a frozen filesystem must thaw before anything waits on it.
    tx = journal.transaction(txid)
    if tx is None:
        return ["no such transaction in the journal"]
    registry = default_registry()
    recorded = {k: v for k, v in tx["options"].items() if k in spec_options()}
    options = Options(**recorded)
    ctx = RunContext(txid, options, tx["base_dir"] or "/", registry.pm.hook)
    holds = [Hold(h["kind"], h["target"], h["data"], h["start"] or 0.0, 0.0 if h["resumed"] else None) for h in tx["holds"]]
    run = TransactionRun(txid, [], ctx, journal=journal, state=TxState(tx["status"]))
    run.result.holds = holds
    try:
        run.resume_holds()
        journal.holds(txid, holds, resumed=True)
    finally:
        ctx.close()
    if journal.fence(txid, why):
        notes.append(f"fenced: {why}")
    notes += [f"resumed {h.kind} {h.target}" for h in holds if h.end is not None]
    notes += [str(lo) for lo in run.result.leftovers]
    return notes


class _Args:
    """The watchdog's command line: ``--journal PATH --txid ID --budget S --pid N [--ready]``."""

    def __init__(self, journal: str, txid: str, budget: float, pid: int, ready: bool) -> None:
        self.journal, self.txid, self.budget, self.pid, self.ready = journal, txid, budget, pid, ready


def _quick(argv: list[str]) -> _Args | None:
    """The command line :class:`Watchdog` writes, read without argparse (its import,
    ~4 ms, is on the run's way to its window); None for anything else (``--help``,
    ``--journal=PATH``, a missing or odd value): argparse then reads it, or says why not."""
    values: dict[str, str] = {}
    ready, rest = False, list(argv)
    while rest:
        flag = rest.pop(0)
        if flag == "--ready":
            ready = True
        elif flag in ("--journal", "--txid", "--budget", "--pid") and flag not in values and rest and not rest[0].startswith("-"):
            values[flag] = rest.pop(0)
        else:
            return None
    if len(values) != 4:
        return None
    try:
        budget, pid = float(values["--budget"]), int(values["--pid"])
    except ValueError:
        return None
    return _Args(values["--journal"], values["--txid"], budget, pid, ready)


def _parse(argv: list[str] | None) -> _Args:
    args = _quick(sys.argv[1:] if argv is None else argv)
    if args is not None:
        return args
    import argparse

    parser = argparse.ArgumentParser(prog="python -m blktx.watchdog", description=__doc__)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--txid", required=True)
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--ready", action="store_true", help="write a byte to stdout once watching")
    got = parser.parse_args(argv)
    return _Args(got.journal, got.txid, got.budget, got.pid, got.ready)


def _signals() -> Any:
    """The C module under ``signal``: ``signal.py`` imports ``enum`` (5 ms of the
    watchdog's start, on the run's way to its window) for what the watchdog does not use."""
    import importlib

    try:
        return importlib.import_module("_signal")
    except ImportError:  # pragma: no cover - not CPython
        return importlib.import_module("signal")


#: Whether this process took over a run (imported blktx, its plugins, the journal).
_acted = False


def end(status: int) -> NoReturn:
    """How the watchdog process exits. One that only watched ends at once
    (``os._exit``): nothing of it needs finalizing, and the interpreter's teardown
    took 2 ms more of the run's wait in :meth:`Watchdog.stop`. One that acted exits
    through the interpreter: plugins' ``atexit`` handlers, the journal's close."""
    if not _acted:
        try:
            sys.stderr.flush()
        finally:
            os._exit(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    global _acted
    args = _parse(argv)
    # A ^C, a hang-up or a service stop (SIGTERM to the whole cgroup) is for the run:
    # the watchdog stays until the run is gone or overran, then ends the holds.
    sig = _signals()
    for signum in (sig.SIGINT, sig.SIGHUP, sig.SIGTERM):
        sig.signal(signum, sig.SIG_IGN)
    if args.ready:  # the run opens its window once it has this
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.write(1, b"r")
        except OSError:
            pass  # the run is gone: watch() sees it
        os.dup2(null, 1)
        os.close(null)
    why = watch(sys.stdin.buffer, args.budget, args.pid)
    if why is None:
        return 0
    _acted = True
    if why.startswith(OVERRAN):
        # Alive: fence before anything, so that it cannot commit once its holds end
        # (already committed: they just need ending), then free what it holds.
        _site()
        from blktx.journal import SqliteJournal

        why = why[len(OVERRAN) :]
        SqliteJournal(args.journal).fence(args.txid, why)
        why = f"{why}; {sever(args.pid)}"
    for note in take_over(args.journal, args.txid, why):
        try:
            print(f"blktx watchdog {args.txid}: {note}", file=sys.stderr, flush=True)
        except OSError:
            pass  # the run's stderr may have gone with it
    return 0


if __name__ == "__main__":
    end(main())
