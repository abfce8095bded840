"""Live VMs over QMP: real qemu-system-x86_64 processes with qcow2 drives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, make_image, needs_qemu_img, needs_qemu_system, snapshots

from blktx import ActionSpec, Event, Executor, Transaction, hookimpl
from blktx.plugins import load

pytestmark = [needs_qemu_img, needs_qemu_system]


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[VM]]:
    machines = [VM(tmp_path, f"vm{i}") for i in range(3)]
    yield machines
    for vm in machines:
        vm.quit() if vm.proc.poll() is None else None


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], extra: list[Any] = (), allow_tcp: bool = False, **options: Any):
    registry = load(extra=[(f"t{i}", p) for i, p in enumerate(extra)])
    return Executor(registry).run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(base)), allow_tcp=allow_tcp
    )


def group(vms: list[VM], name: str = "nightly") -> list[tuple[str, dict[str, Any]]]:
    return [("qmp.internal-create", {"vm": vm.sock.name, "drive": f"drive{d}", "name": name}) for vm in vms for d in range(2)]


def test_three_vms_two_drives_and_offline_images_commit(tmp_path: Path, vms: list[VM]) -> None:
    make_image(tmp_path / "offline.qcow2")
    actions = [
        *group(vms),
        ("qcow2.internal-create", {"image": "offline.qcow2", "name": "nightly"}),
        ("qmp.external-create", {"vm": "vm0.qmp", "drive": "drive0", "overlay": "vm0-d0.nightly.qcow2"}),
    ]
    actions = [
        a for a in actions if not (a[0] == "qmp.internal-create" and a[1]["vm"] == "vm0.qmp" and a[1]["drive"] == "drive0")
    ]
    result = run(tmp_path, actions, quiesce="pause")
    assert result.outcome == "committed", result.summary()
    for vm in vms:
        for d in range(2):
            if (vm.name, d) != ("vm0", 0):
                assert vm.snapshots(d) == ["nightly"]
        assert vm.running()
    assert vms[0].active_file(0) == "vm0-d0.nightly.qcow2"
    assert [n for _, n in snapshots(tmp_path / "offline.qcow2")] == ["nightly"]
    windows = {h.target: h.window for h in result.holds}
    assert len(windows) == 3 and all(w is not None and 0 <= w < 5 for w in windows.values())


@pytest.mark.parametrize("phase", ["do", "invalidate"])
@pytest.mark.parametrize("where", [0, 2])
def test_a_failure_in_any_vm_rolls_back_the_whole_group(tmp_path: Path, vms: list[VM], phase: str, where: int) -> None:
    actions = [*group(vms[:where]), ("fault", {"phase": phase}), *group(vms[where:])]
    actions.insert(0, ("qmp.external-create", {"vm": "vm1.qmp", "drive": "drive1", "overlay": "ov.qcow2"}))
    actions = [
        a for a in actions if not (a[0] == "qmp.internal-create" and a[1]["vm"] == "vm1.qmp" and a[1]["drive"] == "drive1")
    ]
    result = run(tmp_path, actions, quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    for vm in vms:
        assert vm.snapshots(0) == [] and vm.snapshots(1) == [] and vm.running()
    assert vms[1].active_file(1) == "vm1-d1.qcow2" and not (tmp_path / "ov.qcow2").exists()


def test_qemu_error_names_vm_and_drive(tmp_path: Path, vms: list[VM]) -> None:
    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "nodrive", "name": "x"}),
            ("qmp.internal-create", {"vm": "nope.qmp", "drive": "drive0", "name": "x"}),
        ],
    )
    assert result.outcome == "invalid"
    assert "VM " in result.problems[0].message and "'nodrive'" in result.problems[0].message
    assert "nope.qmp" in result.problems[1].message and result.problems[1].target == f"vm:{tmp_path}/nope.qmp/drive0"


def test_one_vm_named_two_ways_is_one_target(tmp_path: Path, vms: list[VM]) -> None:
    """Socket paths are resolved against the spec, so locks and conflicts see one VM:
    one snapshot name twice on its drive is refused."""
    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive0", "name": "a"}),
            ("qmp.internal-create", {"vm": f"../{tmp_path.name}/vm0.qmp", "drive": "drive0", "name": "a"}),
        ],
    )
    assert result.outcome == "invalid"
    assert "actions #0 and #1 both make snapshot 'a'" in result.problems[0].message
    assert result.problems[0].target == f"vm:{tmp_path}/vm0.qmp/drive0" and vms[0].snapshots(0) == []


class Killer:
    """Kills one VM the moment the do phase starts on the action before it."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    @hookimpl
    def blktx_event(self, event: Event) -> None:
        if event.kind == "action" and event.phase == "do" and event.action == 0 and self.vm.proc.poll() is None:
            self.vm.kill()


def test_a_vm_killed_mid_transaction_rolls_back_the_others(tmp_path: Path, vms: list[VM]) -> None:
    actions = [("qcow2.internal-create", {"image": "off.qcow2", "name": "nightly"}), *group(vms)]
    make_image(tmp_path / "off.qcow2")
    result = run(tmp_path, actions, extra=[Killer(vms[1])], jobs=1)
    assert result.outcome == "rolled back", result.summary()
    assert result.failure is not None and "vm1.qmp" in result.failure.message
    assert snapshots(tmp_path / "off.qcow2") == []
    for vm in (vms[0], vms[2]):
        assert vm.snapshots(0) == [] and vm.snapshots(1) == []
    for img in vms[1].images:
        assert snapshots(img) == []


def test_paused_vm_stays_paused_running_vm_runs_again(tmp_path: Path) -> None:
    paused, running = VM(tmp_path, "p", paused=True), VM(tmp_path, "r")
    try:
        for outcome_fault in (False, True):
            acts = [
                ("qmp.internal-create", {"vm": "p.qmp", "drive": "drive0", "name": f"s{outcome_fault}"}),
                ("qmp.internal-create", {"vm": "r.qmp", "drive": "drive0", "name": f"s{outcome_fault}"}),
            ]
            if outcome_fault:
                acts.append(("fault", {"phase": "invalidate"}))
            result = run(tmp_path, acts, quiesce="pause")
            assert result.outcome == ("rolled back" if outcome_fault else "committed")
            assert not paused.running() and running.running()
            assert [h.target for h in result.holds] == [f"vm:{tmp_path / 'r.qmp'}"]
    finally:
        paused.quit()
        running.quit()


def test_guest_writes_after_the_switch_survive_a_rollback(tmp_path: Path, vms: list[VM]) -> None:
    """Cancel after invalidate commits the overlay back: nothing the guest wrote is lost."""
    from blktx_plugins import qmp as qmp_plugin

    class WriteAfterSwitch:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "phase-end" and event.phase == "invalidate":
                vms[0].qmp("human-monitor-command", {"command-line": 'qemu-io drive0 "write -P 0x99 0 64k"'})

    result = run(
        tmp_path,
        [
            ("qmp.external-create", {"vm": "vm0.qmp", "drive": "drive0", "overlay": "ov.qcow2"}),
            ("fault", {"phase": "invalidate"}),
        ],
        extra=[WriteAfterSwitch()],
    )
    assert result.outcome == "rolled back"
    assert vms[0].active_file(0) == "vm0-d0.qcow2" and not (tmp_path / "ov.qcow2").exists()
    assert qmp_plugin.__name__
    vms[0].quit()
    import subprocess

    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0x99 0 64k", str(vms[0].images[0])], capture_output=True, text=True
    )
    assert "Pattern verification failed" not in out.stdout and out.returncode == 0


def test_overlays_are_made_before_the_pause_and_switched_inside_it(tmp_path: Path, vms: list[VM]) -> None:
    """qmp.external-create's do (overlay file, node) runs before the VMs stop; the
    internal snapshot and the switch run while they are stopped."""
    seen: dict[tuple[str, int], bool] = {}

    class Watch:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "action" and event.phase in ("do", "invalidate"):
                seen[(event.phase, event.action)] = vms[0].running()

    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive0", "name": "n"}),
            ("qmp.external-create", {"vm": "vm0.qmp", "drive": "drive1", "overlay": "ov.qcow2"}),
        ],
        extra=[Watch()],
        quiesce="pause",
    )
    assert result.outcome == "committed", result.summary()
    assert seen[("do", 1)] is True, "the overlay was made inside the pause window"
    assert seen[("do", 0)] is False and seen[("invalidate", 1)] is False
    assert vms[0].running() and vms[0].active_file(1) == "ov.qcow2" and vms[0].snapshots(0) == ["n"]
    assert "do (before quiesce)" not in result.phases  # one do entry, both parts timed
    assert result.phases["do"] > 0


def test_a_vm_reached_over_tcp(tmp_path: Path) -> None:
    import socket
    import subprocess
    import time

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = make_image(tmp_path / "t.qcow2")
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"tcp:127.0.0.1:{port},server=on,wait=off",
            "-drive",
            f"if=none,id=drive0,file={image},format=qcow2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"tcp:127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        time.sleep(0.1)  # the probe's connection must be gone: QEMU serves one client per monitor
        result = run(
            tmp_path,
            [("qmp.internal-create", {"vm": address, "drive": "drive0", "name": "over-tcp"}), ("fault", {"phase": "invalidate"})],
            quiesce="pause",
            allow_tcp=True,
        )
        assert result.outcome == "rolled back", result.summary()
        assert [h.target for h in result.holds] == [f"vm:{address}"]
        result = run(
            tmp_path,
            [("qmp.internal-create", {"vm": address, "drive": "drive0", "name": "over-tcp"})],
            quiesce="pause",
            allow_tcp=True,
        )
        assert result.outcome == "committed", result.summary()
        assert result.actions[0].target == f"vm:{address}/drive0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [n for _, n in snapshots(image)] == ["over-tcp"]


@pytest.mark.parametrize("phase", ["do", "invalidate"])
@pytest.mark.parametrize("victim", [0, 1, 2])
def test_qemu_itself_failing_in_any_vm_and_phase_rolls_back_the_group(
    tmp_path: Path, vms: list[VM], phase: str, victim: int
) -> None:
    """QEMU refuses inside one VM: for do, a snapshot of the same name appears
    after the check (made by someone else, so it must survive the rollback); for
    invalidate, the overlay node blktx added is gone before the switch."""
    target = vms[victim]

    class Saboteur:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "phase-start" and event.phase == "do" and phase == "do":
                target.qmp("blockdev-snapshot-internal-sync", {"device": "drive0", "name": "nightly"})
            if event.kind == "phase-end" and event.phase == "do" and phase == "invalidate":
                for node in target.qmp("query-named-block-nodes", {"flat": True}):
                    if node["node-name"].startswith("blktx"):
                        target.qmp("blockdev-del", {"node-name": node["node-name"]})

    actions = [("qmp.internal-create", {"vm": vm.sock.name, "drive": "drive0", "name": "nightly"}) for vm in vms]
    actions += [("qmp.external-create", {"vm": vm.sock.name, "drive": "drive1", "overlay": f"{vm.name}-ov.qcow2"}) for vm in vms]
    result = run(tmp_path, actions, extra=[Saboteur()], quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    assert result.failure is not None and result.failure.phase == phase
    assert str(target.sock) in result.failure.message
    qemu_says = "already exists" if phase == "do" else "Cannot find"
    assert qemu_says in result.failure.message, result.failure.message
    for vm in vms:
        assert vm.snapshots(0) == (["nightly"] if vm is target and phase == "do" else []), vm.name
        assert vm.active_file(1) == f"{vm.name}-d1.qcow2" and not (tmp_path / f"{vm.name}-ov.qcow2").exists()
        assert vm.running()


def test_the_vm_group_example_runs_as_documented(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from blktx.cli import main

    spec = tmp_path / "vm-group.toml"
    shutil.copy(Path(__file__).parent.parent / "specs" / "examples" / "vm-group.toml", spec)
    vm1, vm2 = VM(tmp_path, "vm1", drives=2), VM(tmp_path, "vm2", drives=1)
    try:
        assert main(["run", str(spec), "--journal", str(tmp_path / "j.sqlite")]) == 0
        out = capsys.readouterr().out
        assert "committed" in out and f"quiesced vm:{tmp_path / 'vm1.qmp'} (qmp.pause)" in out
        assert vm1.snapshots(0) == vm1.snapshots(1) == ["nightly"]
        assert vm2.active_file(0) == "vm2-d0.nightly.qcow2" and vm1.running() and vm2.running()
    finally:
        vm1.quit()
        vm2.quit()


def test_drives_named_by_node_name(tmp_path: Path, vms: list[VM]) -> None:
    """`drive` may be a node name (`-drive ...,node-name=vm0-n0`) as well as the drive id."""
    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "vm0-n0", "name": "by-node"}),
            ("qmp.external-create", {"vm": "vm0.qmp", "drive": "vm0-n1", "overlay": "n1.qcow2"}),
        ],
        quiesce="pause",
    )
    assert result.outcome == "committed", result.summary()
    assert vms[0].snapshots(0) == ["by-node"] and vms[0].active_file(1) == "n1.qcow2"
    assert [a.target for a in result.actions] == [f"vm:{tmp_path}/vm0.qmp/drive0", f"vm:{tmp_path}/vm0.qmp/drive1"]
    # the drive's id and its node name are one target
    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "vm0-n0", "name": "a"}),
            ("qmp.external-create", {"vm": "vm0.qmp", "drive": "drive0", "overlay": "n0.qcow2"}),
        ],
    )
    assert result.outcome == "invalid" and "conflicts with action #0" in result.problems[0].message
    assert vms[0].snapshots(0) == ["by-node"] and not (tmp_path / "n0.qcow2").exists()


def test_quiesce_from_the_command_line(tmp_path: Path, vms: list[VM], capsys: pytest.CaptureFixture[str]) -> None:
    from blktx.cli import main

    spec = tmp_path / "t.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "qmp.internal-create"\nvm = "vm0.qmp"\ndrive = "drive0"\nname = "cli"\n')
    assert main(["check", str(spec), "--quiesce", "fsfreeze"]) == 2
    assert "through its guest agent, and this action names none" in " ".join(capsys.readouterr().out.split())
    assert main(["run", str(spec), "--quiesce", "pause", "--no-journal"]) == 0
    assert f"quiesced vm:{tmp_path / 'vm0.qmp'} (qmp.pause)" in "".join(capsys.readouterr().out.split("\n"))
    assert vms[0].snapshots(0) == ["cli"] and vms[0].running()
    with pytest.raises(SystemExit):
        main(["run", str(spec), "--quiesce", "freeze"])
    assert "invalid choice: 'freeze'" in capsys.readouterr().err


class SilentOnStop:
    """A fake VM: a unix socket that greets like QEMU, answers qmp_capabilities and
    queries (one qcow2 drive, running), and never answers ``stop``."""

    def __init__(self, sock: Path, image: Path | str) -> None:
        import socket
        import threading

        self.sock, self.image = sock, image
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(sock))
        self.server.listen(4)
        self.stops = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _reply(self, name: str) -> Any:
        if name == "query-status":
            return {"running": True, "status": "running"}
        if name == "query-block":
            return [
                {
                    "device": "drive0",
                    "qdev": "",
                    "inserted": {
                        "node-name": "n0",
                        "file": str(self.image),
                        "drv": "qcow2",
                        "image": {"virtual-size": 16 << 20, "snapshots": []},
                    },
                }
            ]
        if name == "query-named-block-nodes":
            return []
        return {}

    def _client(self, conn: Any) -> None:
        import json

        decoder, buf = json.JSONDecoder(), ""
        conn.sendall(
            json.dumps(
                {"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 0}, "package": ""}, "capabilities": []}}
            ).encode()
            + b"\r\n"
        )
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    if msg.get("execute") == "stop":
                        self.stops += 1
                        continue  # never answered
                    out = {"return": self._reply(msg.get("execute", ""))}
                    if "id" in msg:
                        out["id"] = msg["id"]
                    conn.sendall(json.dumps(out).encode() + b"\r\n")

    def close(self) -> None:
        self.server.close()


def test_a_vm_that_never_answers_stop_does_not_keep_the_others_paused(tmp_path: Path) -> None:
    """One VM of the group hangs on ``stop``: the real VM runs again within the window
    budget (+1 s), and the group rolls back with the hung VM named."""
    import threading
    import time

    real = VM(tmp_path, "real")
    fake = SilentOnStop(tmp_path / "hung.qmp", make_image(tmp_path / "hung.qcow2"))
    paused_for: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        since = None
        while not stop.is_set():
            running = real.running()
            now = time.monotonic()
            if not running and since is None:
                since = now
            if running and since is not None:
                paused_for.append(now - since)
                since = None
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results: list[Any] = []
    try:
        actions = [
            ("qmp.internal-create", {"vm": "real.qmp", "drive": "drive0", "name": "nightly"}),
            ("qmp.internal-create", {"vm": "hung.qmp", "drive": "drive0", "name": "nightly"}),
        ]
        runner = threading.Thread(
            target=lambda: results.append(run(tmp_path, actions, quiesce="pause", max_window=2.0)), daemon=True
        )
        runner.start()
        runner.join(timeout=30)
        assert not runner.is_alive(), "the run waited for the VM that never answers"
        time.sleep(0.1)
        stop.set()
        watcher.join()
        (result,) = results
        assert result.outcome == "rolled back", result.summary()
        assert fake.stops == 1 and result.failure is not None and "hung.qmp" in result.failure.message
        assert real.running() and real.snapshots(0) == []
        assert paused_for and max(paused_for) <= 2.0 + 1.0, paused_for
    finally:
        stop.set()
        fake.close()
        real.quit()


@pytest.mark.parametrize("confined", [True, False])
def test_a_dead_vms_image_is_undone_offline_only_under_the_roots(tmp_path: Path, confined: bool) -> None:
    """The VM dies after its snapshot was made; the rollback undoes it offline on the
    image file the VM reported. Under the roots: removed. Outside them (the VM's
    folder is only a --vm-root): blktx does not act on it, and says so."""
    from blktx.plugins import load

    spec, vms_dir = tmp_path / "spec", tmp_path / ("spec" if confined else "vms")
    spec.mkdir(exist_ok=True)
    vms_dir.mkdir(exist_ok=True)
    vm = VM(vms_dir, "vm0")

    class KillAtInvalidate:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "phase-start" and event.phase == "invalidate":
                vm.kill()

    try:
        actions = [
            ActionSpec("qmp.internal-create", {"vm": str(vm.sock), "drive": "drive0", "name": "nightly"}),
            ActionSpec("fault", {"phase": "invalidate"}),
        ]
        result = Executor(load(extra=[("kill", KillAtInvalidate())])).run(
            Transaction(actions, base_dir=str(spec)), vm_roots=[str(vms_dir)]
        )
        if confined:
            assert result.outcome == "rolled back", result.summary()
            assert snapshots(vm.images[0]) == []
        else:
            assert result.outcome == "needs recovery", result.summary()
            assert (
                any("[rule confined-paths]" in str(lo) for lo in result.leftovers) or "[rule confined-paths]" in result.summary()
            ), result.summary()
            assert [n for _, n in snapshots(vm.images[0])] == ["nightly"]
    finally:
        if vm.proc.poll() is None:
            vm.quit()


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 256])
def test_a_snapshot_name_qemu_would_refuse_or_cut_is_refused_at_check(tmp_path: Path, vms: list[VM], name: str) -> None:
    result = run(tmp_path, [("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive0", "name": name})])
    assert result.outcome == "invalid", result.summary()
    assert "qmp.internal-create action #0 on drive drive0 of VM" in result.problems[0].message
    assert vms[0].snapshots(0) == []


def test_an_overlay_is_not_made_for_a_drive_the_vm_opened_through_a_protocol(tmp_path: Path) -> None:
    """The VM reports its drive as ``json:{...}``: an overlay would name that as its
    backing file, so the action is refused at check."""
    fake = SilentOnStop(tmp_path / "odd.qmp", 'json:{"driver": "nbd", "server": {"type": "inet", "host": "x"}}')
    try:
        result = run(tmp_path, [("qmp.external-create", {"vm": "odd.qmp", "drive": "drive0", "overlay": "ov.qcow2"})])
        assert result.outcome == "invalid", result.summary()
        assert "not a file path [rule confined-paths]" in result.problems[0].message
        assert not (tmp_path / "ov.qcow2").exists()
    finally:
        fake.close()
