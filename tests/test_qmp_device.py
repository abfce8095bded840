"""qmp.external-create keeps its switch across a restart (``device``: the symlink the
VM's -drive opens, re-pointed like qcow2.external-create does) or says it does not
(a warning); a QMP monitor another client holds is reported at once. Real
qemu-system-x86_64 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, make_image, needs_qemu_img, needs_qemu_system

from blktx import ActionSpec, Executor, Transaction
from blktx.testing.fixtures import one_command

pytestmark = [needs_qemu_img, needs_qemu_system]

EXT = "qmp.external-create"


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], allow_tcp: bool = False, **options: Any) -> Any:
    return Executor().run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(base)), allow_tcp=allow_tcp
    )


class Guest:
    """``qemu-system-x86_64 -machine none`` whose drive0 is opened through ``file``
    (the device symlink), with blktx's monitor ``sock`` and the test's own ``ctl``."""

    def __init__(self, folder: Path, file: Path, name: str = "g") -> None:
        self.sock, self.ctl = folder / f"{name}.qmp", folder / f"{name}.ctl"
        for s in (self.sock, self.ctl):
            s.unlink(missing_ok=True)
        self.log = open(folder / f"{name}.out", "w+b")  # qemu-io (HMP) prints to QEMU's stdout
        self.proc = subprocess.Popen(
            [
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
                "-drive",
                f"if=none,id=drive0,file={file},format=qcow2",
            ],
            stdout=self.log,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return one_command(self.ctl, cmd, args)

    def io(self, command: str) -> str:
        """What ``qemu-io`` on drive0 printed, run inside the VM."""
        start = self.log.seek(0, os.SEEK_END)
        self.qmp("human-monitor-command", {"command-line": f'qemu-io drive0 "{command}"'})
        deadline = time.monotonic() + 5
        while True:
            self.log.seek(start)
            out = self.log.read().decode()
            if "ops/sec" in out or time.monotonic() > deadline:
                return out
            time.sleep(0.01)

    def drive(self) -> dict[str, Any]:
        return next(d["inserted"] for d in self.qmp("query-block") if d["device"] == "drive0")

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    make_image(tmp_path / "g-d0.qcow2", pattern=0x30)
    os.symlink("g-d0.qcow2", tmp_path / "g.img")
    vm = Guest(tmp_path, tmp_path / "g.img")
    yield vm
    vm.quit()


def backing(image: Path) -> str:
    info = json.loads(
        subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True).stdout
    )
    return str(info.get("full-backing-filename") or info.get("backing-filename") or "")


def top(drive: dict[str, Any]) -> str:
    """The drive's top image file (QEMU names a chain whose backing it opened by another
    name than the overlay's header says by a json: filename)."""
    file = str(drive["file"])
    return str(json.loads(file[5:])["file"]["filename"]) if file.startswith("json:") else file


def restart_warnings(result: Any) -> list[str]:
    return [w for w in result.warnings if "a restart of the VM with its old -drive boots" in w]


def test_the_device_follows_the_switch_and_a_restart_boots_the_new_image(tmp_path: Path, guest: Guest) -> None:
    spec = {"vm": str(guest.sock), "drive": "drive0", "overlay": "g.s1.qcow2", "device": "g.img"}
    result = run(tmp_path, [(EXT, spec)], quiesce="pause")
    assert result.outcome == "committed", result.summary()
    assert os.readlink(tmp_path / "g.img") == "g.s1.qcow2" and not restart_warnings(result)
    assert backing(tmp_path / "g.s1.qcow2") == str(tmp_path / "g-d0.qcow2"), "the image itself, never the symlink"
    assert not [p for p in os.listdir(tmp_path) if ".blktx-" in p], "no private symlink or overlay left"
    assert "wrote" in guest.io("write -P 0x77 0 64k")  # the guest writes after the switch
    # a second switch before any restart (QEMU now names the drive by a json: filename)
    assert guest.drive()["file"].startswith("json:")
    result = run(tmp_path, [(EXT, {**spec, "overlay": "g.s2.qcow2"})])
    assert result.outcome == "committed", result.summary()
    assert os.readlink(tmp_path / "g.img") == "g.s2.qcow2" and backing(tmp_path / "g.s2.qcow2") == str(tmp_path / "g.s1.qcow2")
    assert "wrote" in guest.io("write -P 0x66 128k 64k")
    guest.quit()
    again = Guest(tmp_path, tmp_path / "g.img")  # a restart with the same -drive file=g.img
    try:
        drive = again.drive()
        assert drive["file"] == str(tmp_path / "g.img")
        chain = drive["image"]["backing-image"]
        assert [chain["filename"], chain["backing-image"]["filename"]] == [
            str(tmp_path / f) for f in ("g.s1.qcow2", "g-d0.qcow2")
        ]
        for pattern, where in (("0x77", "0"), ("0x66", "128k"), ("0x30", "64k")):  # 0x30: the base's data below
            out = again.io(f"read -P {pattern} {where} 64k")
            assert "read 65536/65536" in out and "Pattern verification failed" not in out, out
    finally:
        again.quit()


@pytest.mark.parametrize("phase", ["do", "invalidate"])
def test_a_rollback_re_points_the_device_back(tmp_path: Path, guest: Guest, phase: str) -> None:
    before = sorted(os.listdir(tmp_path))
    spec = {"vm": str(guest.sock), "drive": "drive0", "overlay": "g.s1.qcow2", "device": "g.img"}
    result = run(tmp_path, [(EXT, spec), ("fault", {"phase": phase})], quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    assert os.readlink(tmp_path / "g.img") == "g-d0.qcow2" and sorted(os.listdir(tmp_path)) == before
    assert guest.drive()["file"] == str(tmp_path / "g.img") and not restart_warnings(result)


def test_device_refusals(tmp_path: Path, guest: Guest) -> None:
    make_image(tmp_path / "other.qcow2")
    os.symlink("other.qcow2", tmp_path / "other.img")
    cases = [
        ("g-d0.qcow2", "is not a symlink"),
        ("other.img", f"points to {tmp_path / 'other.qcow2'}, but drive drive0 of VM {guest.sock} uses {tmp_path / 'g.img'}"),
    ]
    for device, why in cases:
        result = run(tmp_path, [(EXT, {"vm": str(guest.sock), "drive": "drive0", "overlay": "ov.qcow2", "device": device})])
        assert result.outcome == "invalid" and why in str(result.problems[0]), result.summary()
    assert os.readlink(tmp_path / "g.img") == "g-d0.qcow2" and not (tmp_path / "ov.qcow2").exists()


def test_without_a_device_a_committed_switch_warns_about_a_restart(tmp_path: Path) -> None:
    vm = VM(tmp_path, "vm0")
    try:
        base = {"vm": str(vm.sock), "drive": "drive0"}
        result = run(tmp_path, [(EXT, {**base, "overlay": "a.qcow2"}), ("fault", {"phase": "invalidate"})])
        assert result.outcome == "rolled back" and not restart_warnings(result), result.warnings
        result = run(tmp_path, [(EXT, {**base, "overlay": "b.qcow2"})])
        assert result.outcome == "committed", result.summary()
        (warning,) = restart_warnings(result)
        assert f"drive drive0 of VM {vm.sock} now writes to {tmp_path / 'b.qcow2'}" in warning
        assert f"boots {tmp_path / 'vm0-d0.qcow2'} again" in warning and "give device = " in warning
    finally:
        vm.quit()


def test_a_run_killed_at_every_journal_write_is_recovered_with_the_device_before_or_after(tmp_path: Path, guest: Guest) -> None:
    """A real run in a child process, killed after each journal write, then blktx
    recover: the device and the drive are both before or both after, never mixed."""
    spec = tmp_path / "spec.toml"
    kills = 0
    for n in range(1, 30):
        overlay = f"g.k{n}.qcow2"
        spec.write_text(
            'version = 1\n[options]\nquiesce = "pause"\n[[action]]\n'
            f'type = "{EXT}"\nvm = "g.qmp"\ndrive = "drive0"\noverlay = "{overlay}"\ndevice = "g.img"\n'
        )
        before = (os.readlink(tmp_path / "g.img"), top(guest.drive()))
        journal = str(tmp_path / f"j{n}.sqlite")
        env = {**os.environ, "BLKTX_CRASH_AFTER": str(n)}
        out = subprocess.run(
            [sys.executable, "-m", "blktx", "run", str(spec), "--journal", journal], env=env, capture_output=True, text=True
        )
        if out.returncode == 0:
            assert os.readlink(tmp_path / "g.img") == overlay
            break
        kills = n
        assert out.returncode == -9, out.stdout + out.stderr
        rec = subprocess.run([sys.executable, "-m", "blktx", "recover", "--journal", journal], capture_output=True, text=True)
        assert rec.returncode == 0, rec.stdout + rec.stderr
        link = os.readlink(tmp_path / "g.img")
        drive = guest.drive()
        assert guest.qmp("query-status")["running"], f"kill after write {n}: the VM stays paused"
        if link == overlay:  # after: the drive writes to the overlay too
            assert top(drive) == str(tmp_path / overlay), f"kill after write {n}: {drive['file']}"
        else:
            assert link == before[0] and not (tmp_path / overlay).exists(), f"kill after write {n}"
            assert top(drive) == before[1], f"kill after write {n}: {drive['file']}"
        assert not [p for p in os.listdir(tmp_path) if ".blktx-" in p], f"kill after write {n}: a private name is left"
    assert kills >= 4, f"only {kills} kills"


def hold(address: Any) -> socket.socket:
    """Connect to a monitor as another client would, and keep it."""
    holder = socket.socket(socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX)
    holder.connect(address)
    assert b"QMP" in holder.recv(4096)  # greeted: the monitor is ours
    return holder


def test_a_monitor_held_by_another_client_is_reported_at_once(tmp_path: Path) -> None:
    from blktx_plugins._qmp_monitor import busy_message

    vm = VM(tmp_path, "vm0")
    holder = hold(str(vm.sock))
    try:
        started = time.monotonic()
        result = run(tmp_path, [("qmp.internal-create", {"vm": str(vm.sock), "drive": "drive0", "name": "s"})])
        took = time.monotonic() - started
        assert result.outcome == "invalid", result.summary()
        problem = result.problems[0]
        assert busy_message(str(vm.sock)) in str(problem) and "for libvirt's domains use the libvirt.* types" in str(problem)
        assert "a second -qmp" in (problem.hint or "")
        assert took < 3, f"refused after {took:.1f} s"
        holder.close()
        time.sleep(0.2)
        result = run(tmp_path, [("qmp.internal-create", {"vm": str(vm.sock), "drive": "drive0", "name": "s"})])
        assert result.outcome == "committed", result.summary()
        assert vm.snapshots(0) == ["s"]
    finally:
        holder.close()
        vm.quit()


def test_a_monitor_held_over_tcp_is_reported_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = make_image(tmp_path / "t.qcow2")
    proc = subprocess.Popen(
        [
            *("qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"),
            *("-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off", "-drive", f"if=none,id=drive0,file={image},format=qcow2"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    holder = None
    try:
        deadline = time.monotonic() + 10
        while holder is None and time.monotonic() < deadline:
            try:
                holder = hold(("127.0.0.1", port))
            except OSError:
                time.sleep(0.02)
        started = time.monotonic()
        address = f"tcp:127.0.0.1:{port}"
        result = run(tmp_path, [("qmp.internal-create", {"vm": address, "drive": "drive0", "name": "s"})], allow_tcp=True)
        assert result.outcome == "invalid" and "is held by another client (libvirt?)" in str(result.problems[0])
        assert time.monotonic() - started < 3
    finally:
        if holder is not None:
            holder.close()
        proc.terminate()
        proc.wait(timeout=10)
