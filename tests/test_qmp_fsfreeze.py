"""``quiesce = "fsfreeze"`` and ``"fsfreeze+pause"``: filesystems frozen through
QEMU's guest agent around the snapshot of a real VM.

No guest kernel runs here, so the agent is a real ``qemu-ga`` on this host,
reached the way blktx reaches a VM's agent channel (a unix socket), freezing a
loop-mounted btrfs. A write into that filesystem is the probe: it must wait
while the snapshot is taken and go through once blktx has thawed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, GuestAgent, make_image, needs_qemu_ga, needs_qemu_img, needs_qemu_system, snapshots

from blktx import ActionSpec, Event, Executor, Transaction, hookimpl
from blktx.plugins import load

pytestmark = [needs_qemu_img, needs_qemu_system, needs_qemu_ga]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    machine = VM(tmp_path, "vm")
    yield machine
    machine.quit()


@pytest.fixture
def agent(tmp_path: Path, btrfs_mount: Path) -> Iterator[GuestAgent]:
    ga = GuestAgent(tmp_path, [btrfs_mount])
    yield ga
    ga.stop()


class Probe:
    """When the do phase reaches the first action, start a write into the frozen
    filesystem and see whether it went through within 0.3 s; also note whether
    the VM was running."""

    def __init__(self, mnt: Path, vm: VM) -> None:
        self.file = mnt / "data" / "written-during-do"
        self.vm = vm
        self.done = threading.Event()
        self.blocked: bool | None = None
        self.vm_running: bool | None = None

    def _write(self) -> None:
        self.file.write_text("x")
        self.done.set()

    @hookimpl
    def blktx_event(self, event: Event) -> None:
        if event.kind == "action" and event.phase == "do" and self.blocked is None:
            threading.Thread(target=self._write, daemon=True).start()
            self.blocked = not self.done.wait(0.3)
            self.vm_running = self.vm.running()


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], extra: list[Any] = (), **options: Any):
    registry = load(extra=[(f"t{i}", p) for i, p in enumerate(extra)])
    # the agent over TCP is this test's own relay on the loopback
    return Executor(registry).run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(base)), allow_tcp=True
    )


def snap(mnt: Path, name: str = "nightly", **extra: Any) -> tuple[str, dict[str, Any]]:
    return (
        "qmp.internal-create",
        {"vm": "vm.qmp", "drive": "drive0", "name": name, "agent": "qga.sock", "freeze": [str(mnt)], **extra},
    )


def test_fsfreeze_holds_writes_during_the_snapshot_and_thaws_after(
    tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path
) -> None:
    probe = Probe(btrfs_mount, vm)
    result = run(tmp_path, [snap(btrfs_mount)], extra=[probe], quiesce="fsfreeze")
    assert result.outcome == "committed", result.summary()
    assert probe.blocked is True, "a write into the guest filesystem went through during the snapshot"
    assert probe.vm_running is True  # fsfreeze alone leaves the VM running
    assert probe.done.wait(5), "the write never went through: the filesystem stayed frozen"
    assert agent.status() == "thawed"
    assert vm.snapshots(0) == ["nightly"] and vm.running()
    assert [(h.kind, h.target) for h in result.holds] == [("qga.freeze", f"vm:{tmp_path / 'vm.qmp'}")]
    assert result.holds[0].window is not None and 0.3 <= result.holds[0].window < 10


def test_fsfreeze_and_pause_roll_back_thawed_and_running(tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path) -> None:
    probe = Probe(btrfs_mount, vm)
    result = run(tmp_path, [snap(btrfs_mount), ("fault", {"phase": "invalidate"})], extra=[probe], quiesce="fsfreeze+pause")
    assert result.outcome == "rolled back", result.summary()
    assert probe.blocked is True and probe.vm_running is False  # frozen and paused during do
    assert probe.done.wait(5) and agent.status() == "thawed" and vm.running()
    assert vm.snapshots(0) == []
    # frozen first, paused second; resumed in reverse (a paused guest cannot thaw)
    assert [h.kind for h in result.holds] == ["qga.freeze", "qmp.pause"]
    freeze, pause = result.holds
    assert freeze.start <= pause.start and pause.end is not None and freeze.end is not None
    assert pause.end <= freeze.end


def test_a_guest_frozen_before_the_run_stays_frozen(tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path) -> None:
    assert agent.cmd("guest-fsfreeze-freeze-list", {"mountpoints": [str(btrfs_mount)]}) == 1
    try:
        result = run(tmp_path, [snap(btrfs_mount)], quiesce="fsfreeze")
        assert result.outcome == "committed", result.summary()
        assert result.holds == [] and agent.status() == "frozen"
    finally:
        agent.cmd("guest-fsfreeze-thaw")
    assert agent.status() == "thawed"


def test_fsfreeze_needs_an_agent_that_answers(tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path) -> None:
    no_agent = ("qmp.internal-create", {"vm": "vm.qmp", "drive": "drive0", "name": "a"})
    result = run(tmp_path, [no_agent], quiesce="fsfreeze")
    assert result.outcome == "invalid"
    assert "guest agent" in result.problems[0].message and "vm.qmp" in result.problems[0].message
    assert 'agent = "' in (result.problems[0].hint or "")

    result = run(tmp_path, [snap(btrfs_mount, agent="gone.sock")], quiesce="fsfreeze")
    assert result.outcome == "invalid"
    assert str(tmp_path / "gone.sock") in result.problems[0].message
    assert vm.snapshots(0) == []


def test_a_path_that_is_no_mountpoint_fails_the_freeze_and_changes_nothing(
    tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path
) -> None:
    (tmp_path / "plain").mkdir()
    result = run(tmp_path, [snap(btrfs_mount, freeze=[str(btrfs_mount), str(tmp_path / "plain")])], quiesce="fsfreeze")
    assert result.outcome == "rolled back"
    assert result.failure is not None and result.failure.phase == "quiesce"
    assert "froze 1 of the 2 filesystems" in result.failure.message and "vm.qmp" in result.failure.message
    assert agent.status() == "thawed" and vm.snapshots(0) == [] and vm.running()
    (btrfs_mount / "data" / "after").write_text("writable")  # thawed: this would hang if not
    assert os.path.exists(btrfs_mount / "data" / "after")


def test_resume_thaws_after_cont_even_when_the_vm_died(tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path) -> None:
    """A VM killed inside the window: the group rolls back, its agent's guest is
    still thawed (here the agent outlives the VM, as a host agent does)."""

    class KillAtDo:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "action" and event.phase == "do" and event.action == 0 and vm.proc.poll() is None:
                vm.kill()

    make_image(tmp_path / "off.qcow2")
    started = time.monotonic()
    result = run(
        tmp_path,
        [("qcow2.internal-create", {"image": "off.qcow2", "name": "nightly"}), snap(btrfs_mount)],
        extra=[KillAtDo()],
        quiesce="fsfreeze+pause",
        jobs=1,
    )
    assert result.outcome == "rolled back", result.summary()
    assert result.failure is not None and "vm.qmp" in result.failure.message
    assert agent.status() == "thawed" and snapshots(tmp_path / "off.qcow2") == []
    assert time.monotonic() - started < 30


def test_a_paused_vm_is_not_frozen(tmp_path: Path, agent: GuestAgent, btrfs_mount: Path) -> None:
    """A paused guest cannot answer its agent (here the host agent could, so only
    blktx's own rule keeps it from freezing) and its disks do not change."""
    paused = VM(tmp_path, "vm", paused=True)
    try:
        result = run(tmp_path, [snap(btrfs_mount)], quiesce="fsfreeze+pause")
        assert result.outcome == "committed", result.summary()
        assert result.holds == [] and agent.status() == "thawed" and not paused.running()
        assert paused.snapshots(0) == ["nightly"]
    finally:
        paused.quit()


def test_blktx_interrupted_inside_the_window_thaws_and_continues(
    tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path
) -> None:
    """`blktx run` gets SIGTERM while the guest is frozen and the VM paused (an exec
    action sleeps in do): it rolls back, continues the VM and thaws the guest."""
    import signal
    import subprocess
    import sys

    (tmp_path / "t.toml").write_text(
        'version = 1\n[options]\nquiesce = "fsfreeze+pause"\n'
        '[[action]]\ntype = "qmp.internal-create"\nvm = "vm.qmp"\ndrive = "drive0"\nname = "s"\n'
        f'agent = "qga.sock"\nfreeze = ["{btrfs_mount}"]\n'
        '[[action]]\ntype = "exec"\ntarget = "slow"\ndo = ["sleep", "1"]\ncancel = ["true"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", str(tmp_path / "t.toml"), "--allow-exec", "--journal", str(tmp_path / "j.sqlite")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while vm.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not vm.running(), "blktx never paused the VM"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert "interrupted by SIGTERM" in out + err and "rolled back" in out + err
    assert vm.running() and agent.status() == "thawed" and vm.snapshots(0) == []


# -- a real guest ---------------------------------------------------------------
# The host's Debian kernel and an initramfs with the host's qemu-ga, booted by
# QEMU (TCG) with a virtio-blk ext4 disk and a virtio-serial agent channel: the
# agent runs inside the guest and freezes the guest's own filesystem (tests/guest.py).


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import guest as guests

    why = guests.why_not()
    if why:
        pytest.skip(f"a real guest {why}")
    directory = tmp_path_factory.mktemp("guest")
    g = guests.Guest(directory, guests.build_initramfs(directory / "initrd.gz"))
    yield g
    g.quit()


def test_a_real_guest_frozen_through_its_agent_gives_a_clean_filesystem(guest: Any, tmp_path: Path) -> None:
    """ext4 marks a mounted filesystem needs_recovery and clears it on freeze: a
    snapshot taken with the guest frozen is clean, one taken with the VM merely
    paused is not (the guest writes to its disk every 10 ms)."""
    import guest as guests

    base = guest.sock.parent
    frozen = run(
        base,
        [
            (
                "qmp.internal-create",
                {"vm": guest.sock.name, "drive": "drive0", "name": "frozen", "agent": guest.agent.name, "freeze": ["/mnt"]},
            )
        ],
        quiesce="fsfreeze+pause",
    )
    assert frozen.outcome == "committed", frozen.summary()
    assert [h.kind for h in frozen.holds] == ["qga.freeze", "qmp.pause"]
    assert guest.cmd_agent("guest-fsfreeze-status") == "thawed" and guest.qmp("query-status")["running"]
    paused = run(base, [("qmp.internal-create", {"vm": guest.sock.name, "drive": "drive0", "name": "paused"})], quiesce="pause")
    assert paused.outcome == "committed", paused.summary()
    assert "needs_recovery" not in guests.superblock_features(guest.disk, "frozen", tmp_path)
    assert "needs_recovery" in guests.superblock_features(guest.disk, "paused", tmp_path)
    handle = guest.cmd_agent("guest-file-open", {"path": "/mnt/after", "mode": "w"})  # writable again
    guest.cmd_agent("guest-file-write", {"handle": handle, "buf-b64": "b2s="})
    guest.cmd_agent("guest-file-close", {"handle": handle})


def test_a_real_guest_is_thawed_and_running_after_a_rollback(guest: Any) -> None:
    base = guest.sock.parent
    before = [s["name"] for s in guest.qmp("query-block")[0]["inserted"]["image"].get("snapshots", [])]
    result = run(
        base,
        [
            ("qmp.internal-create", {"vm": guest.sock.name, "drive": "drive0", "name": "rolled", "agent": guest.agent.name}),
            ("fault", {"phase": "invalidate"}),
        ],
        quiesce="fsfreeze+pause",
    )
    assert result.outcome == "rolled back", result.summary()
    assert [h.kind for h in result.holds] == ["qga.freeze", "qmp.pause"] and all(h.end for h in result.holds)
    assert guest.cmd_agent("guest-fsfreeze-status") == "thawed" and guest.qmp("query-status")["running"]
    assert [s["name"] for s in guest.qmp("query-block")[0]["inserted"]["image"].get("snapshots", [])] == before


def test_a_real_guest_killed_inside_the_window_is_continued_then_thawed_by_recover(guest: Any) -> None:
    """Killed while the guest is frozen and paused: recover must `cont` before it
    thaws (a paused guest's agent cannot answer), at every kill point."""
    import json
    import signal
    import subprocess
    import sys

    base = guest.sock.parent
    both_held = 0
    for n in range(3, 12):
        spec = base / f"kill{n}.toml"
        spec.write_text(
            'version = 1\n[options]\nquiesce = "fsfreeze+pause"\n'
            '[[action]]\ntype = "qmp.internal-create"\n'
            f'vm = "{guest.sock.name}"\ndrive = "drive0"\nname = "kill{n}"\n'
            f'agent = "{guest.agent.name}"\nfreeze = ["/mnt"]\n'
        )
        journal = base / f"kill{n}.sqlite"
        # as after a power loss: no watchdog ends the holds, recover must
        env = {**os.environ, "BLKTX_CRASH_AFTER": str(n), "BLKTX_WATCHDOG": "0"}
        out = subprocess.run(
            [sys.executable, "-m", "blktx", "run", str(spec), "--journal", str(journal)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        paused = not guest.qmp("query-status")["running"]
        both_held += paused
        started = time.monotonic()
        rec = subprocess.run(
            [sys.executable, "-m", "blktx", "recover", "--json", "--journal", str(journal)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rec.returncode == 0, rec.stdout + rec.stderr
        # (killed before BEGIN: nothing to recover but a stale lock)
        assert [t["outcome"] for t in json.loads(rec.stdout)["transactions"]] in ([], ["rolled back"], ["committed"])
        assert time.monotonic() - started < 20, "recover waited on a paused guest's agent"
        assert guest.qmp("query-status")["running"], f"kill after write {n}: still paused"
        assert guest.cmd_agent("guest-fsfreeze-status") == "thawed", f"kill after write {n}: still frozen"
    assert both_held >= 1, "no kill point found the guest frozen and paused"


def test_an_agent_reached_over_tcp(tmp_path: Path, vm: VM, agent: GuestAgent, btrfs_mount: Path) -> None:
    """`agent = "tcp:HOST:PORT"` (a chardev socket on TCP): here a relay from a
    loopback port to the agent's unix socket."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # shutdown, not close: it also wakes the other direction's recv
            for sock in (dst, src):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def relay() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(agent.sock))
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    try:
        probe = Probe(btrfs_mount, vm)
        result = run(tmp_path, [snap(btrfs_mount, agent=f"tcp:127.0.0.1:{port}")], extra=[probe], quiesce="fsfreeze")
        assert result.outcome == "committed", result.summary()
        assert probe.blocked is True and probe.done.wait(5)
        assert [h.target for h in result.holds] == [f"vm:{tmp_path / 'vm.qmp'}"]
    finally:
        listener.close()
    assert agent.status() == "thawed"


def test_a_real_guest_killed_inside_the_window_is_continued_and_thawed_by_the_watchdog(guest: Any) -> None:
    """No `blktx recover`: the dead-man switch ends both holds (cont, then thaw)."""
    import signal
    import subprocess
    import sys

    base = guest.sock.parent
    both_held = 0
    for n in range(3, 12):
        spec = base / f"wd{n}.toml"
        spec.write_text(
            'version = 1\n[options]\nquiesce = "fsfreeze+pause"\n'
            '[[action]]\ntype = "qmp.internal-create"\n'
            f'vm = "{guest.sock.name}"\ndrive = "drive0"\nname = "wd{n}"\n'
            f'agent = "{guest.agent.name}"\nfreeze = ["/mnt"]\n'
        )
        journal = base / f"wd{n}.sqlite"
        out = subprocess.run(
            [sys.executable, "-m", "blktx", "run", str(spec), "--journal", str(journal)],
            capture_output=True,
            text=True,
            env={**os.environ, "BLKTX_CRASH_AFTER": str(n)},
            timeout=60,
        )
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        killed = time.monotonic()
        while time.monotonic() - killed < 10 and not (
            guest.qmp("query-status")["running"] and guest.cmd_agent("guest-fsfreeze-status") == "thawed"
        ):
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert guest.qmp("query-status")["running"], f"kill after write {n}: still paused"
        assert guest.cmd_agent("guest-fsfreeze-status") == "thawed", f"kill after write {n}: still frozen"
        both_held += took > 0.05
        assert took < 5, f"kill after write {n}: the watchdog took {took:.2f} s"
        rec = subprocess.run(
            [sys.executable, "-m", "blktx", "recover", "--json", "--journal", str(journal)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rec.returncode == 0, rec.stdout + rec.stderr
    assert both_held >= 1, "no kill point left the guest held for the watchdog to end"
