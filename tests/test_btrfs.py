from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from qemu_helpers import VM, make_image, needs_qemu_img, needs_qemu_system, snapshots, subvolumes, world

from blktx import ActionSpec, Executor, Transaction
from blktx.plugins import default_registry


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], **kw: Any):
    return Executor(default_registry()).run(Transaction([ActionSpec(t, p) for t, p in actions], base_dir=str(base)), **kw)


def test_snapshot_appears_readonly_and_cancel_removes_only_it(btrfs_mount: Path) -> None:
    result = run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "data.nightly"})])
    assert result.outcome == "committed", result.summary()
    assert subvolumes(btrfs_mount) == ["data", "data.nightly"]
    assert (btrfs_mount / "data.nightly" / "file").read_text() == "precious"
    ro = subprocess.run(
        ["btrfs", "property", "get", str(btrfs_mount / "data.nightly"), "ro"], capture_output=True, text=True
    ).stdout
    assert "ro=true" in ro
    result = run(
        btrfs_mount,
        [("btrfs.snapshot", {"source": "data", "dest": "data.hourly", "readonly": False}), ("fault", {"phase": "invalidate"})],
    )
    assert result.outcome == "rolled back"
    assert subvolumes(btrfs_mount) == ["data", "data.nightly"]


def test_refusals(btrfs_mount: Path) -> None:
    (btrfs_mount / "plain").mkdir()
    result = run(
        btrfs_mount,
        [
            ("btrfs.snapshot", {"source": "plain", "dest": "x"}),
            ("btrfs.snapshot", {"source": "data", "dest": "data"}),
            ("btrfs.delete", {"path": "plain"}),
        ],
    )
    assert result.outcome == "invalid"
    messages = [p.message for p in result.problems]
    assert messages[0].endswith("plain is not a btrfs subvolume") and messages[1].endswith("data already exists")
    assert messages[2].endswith("plain is not a btrfs subvolume")
    assert subvolumes(btrfs_mount) == ["data"]


def test_delete_is_a_finalize_step(btrfs_mount: Path) -> None:
    assert run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "old"})]).outcome == "committed"
    result = run(btrfs_mount, [("btrfs.delete", {"path": "old"}), ("fault", {"phase": "do"})])
    assert result.outcome == "rolled back" and subvolumes(btrfs_mount) == ["data", "old"]
    result = run(btrfs_mount, [("btrfs.delete", {"path": "old"}), ("btrfs.snapshot", {"source": "data", "dest": "new"})])
    assert result.outcome == "committed" and subvolumes(btrfs_mount) == ["data", "new"]


@needs_qemu_img
@needs_qemu_system
def test_mixed_group_failing_in_its_last_action_leaves_everything(btrfs_mount: Path, tmp_path: Path) -> None:
    base = btrfs_mount / "data"
    vm = VM(tmp_path, "vm1")
    for i in range(2):
        make_image(base / f"d{i}.qcow2", pattern=i + 1)
    make_image(base / "vm.base.qcow2")
    os.symlink("vm.base.qcow2", base / "vm")
    marker = base / "lv-created"
    before_images = world(base)
    actions = [
        ("qcow2.internal-create", {"image": "d0.qcow2", "name": "nightly"}),
        ("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"}),
        ("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"}),
        ("btrfs.snapshot", {"source": ".", "dest": "../data.nightly"}),
        (
            "exec",
            {
                "target": "lvm:vg0/root",
                "do": [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
                "cancel": [sys.executable, "-c", f"import os; os.path.exists({str(marker)!r}) and os.unlink({str(marker)!r})"],
            },
        ),
        (
            "exec",
            {
                "target": "array",
                "do": [sys.executable, "-c", "import sys; sys.exit('array offline')"],
                "cancel": [sys.executable, "-c", "pass"],
            },
        ),
    ]
    actions[3:3] = [
        ("qmp.internal-create", {"vm": str(vm.sock), "drive": "drive0", "name": "nightly"}),
        ("qmp.external-create", {"vm": str(vm.sock), "drive": "drive1", "overlay": str(base / "vm1.ov.qcow2")}),
    ]
    try:
        result = run(
            base, actions, allow_exec=True, roots=[str(btrfs_mount)], overrides={"quiesce": "pause"}, vm_roots=[str(tmp_path)]
        )  # the VM socket lives outside the btrfs
        assert result.outcome == "rolled back", result.summary()
        assert vm.snapshots(0) == [] and vm.active_file(1) == "vm1-d1.qcow2" and vm.running()
        assert len(result.holds) == 1 and result.holds[0].window is not None
    finally:
        vm.quit()
    assert "array offline" in result.failure.message
    assert world(base) == before_images
    assert snapshots(base / "d0.qcow2") == [] and not marker.exists()
    assert subvolumes(btrfs_mount) == ["data"]


def _checked(base: Path, params: dict[str, Any]) -> tuple[Any, Any, Any]:
    """One bound, checked btrfs.snapshot action, as a run has it before its do."""
    from blktx.context import RunContext
    from blktx.executor import Executor as Ex
    from blktx.spec import bind

    registry = default_registry()
    actions, options = bind(Transaction([ActionSpec("btrfs.snapshot", params)], base_dir=str(base)), registry)
    ctx = RunContext("owned", options, str(base), registry.pm.hook)
    executor = Ex(registry)
    assert executor.check_actions(actions, ctx, None) == []
    return executor, actions[0], ctx


def test_a_snapshot_made_by_hand_at_dest_survives_a_cancel(btrfs_mount: Path) -> None:
    """The run died after its do intent, before do; someone snapshots the same source
    at dest by hand. Recover's cancel must not take it for blktx's (same parent UUID)."""
    executor, action, ctx = _checked(btrfs_mount, {"source": "data", "dest": "data.nightly"})
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", str(btrfs_mount / "data"), str(btrfs_mount / "data.nightly")],
        check=True,
        capture_output=True,
    )
    action.state = "DOING"  # the journal said it began
    assert executor.step("cancel", [action], ctx) == []
    assert subvolumes(btrfs_mount) == ["data", "data.nightly"]


def test_a_folder_that_appears_at_dest_after_the_check_is_left_alone(btrfs_mount: Path) -> None:
    """do makes the snapshot privately and never renames it over what appeared at
    dest (rename(2) would replace an empty folder); cancel removes only its own."""
    executor, action, ctx = _checked(btrfs_mount, {"source": "data", "dest": "data.nightly"})
    (btrfs_mount / "data.nightly").mkdir()
    failures = executor.step("do", [action], ctx)
    assert failures and "appeared after the check" in failures[0].message
    assert action.undo["uuid"]
    assert executor.step("cancel", [action], ctx) == []
    assert (btrfs_mount / "data.nightly").is_dir() and subvolumes(btrfs_mount) == ["data"]
    assert sorted(p.name for p in btrfs_mount.iterdir()) == ["data", "data.nightly"], "no private name is left"


def test_every_crash_point(btrfs_mount: Path, tmp_path: Path) -> None:
    """Killed after each journal write (the UUID's remember write included), recover
    leaves the world as before or after, and never a private name."""
    import json
    import signal

    spec = tmp_path / "t.toml"
    spec.write_text(
        f'version = 1\n[[action]]\ntype = "btrfs.snapshot"\nsource = "{btrfs_mount / "data"}"\n'
        f'dest = "{btrfs_mount / "data.nightly"}"\n'
    )

    def blktx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "blktx.cli", *args, "--root", str(btrfs_mount)],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            check=False,
        )

    tried = 0
    for n in range(1, 30):
        journal = tmp_path / f"j{n}.sqlite"
        out = blktx("run", str(spec), "--journal", str(journal), env={"BLKTX_CRASH_AFTER": str(n)})
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        tried += 1
        rec = subprocess.run(
            [sys.executable, "-m", "blktx.cli", "recover", "--json", "--journal", str(journal)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert rec.returncode == 0, rec.stdout + rec.stderr
        names = sorted(p.name for p in btrfs_mount.iterdir())
        assert names in (["data"], ["data", "data.nightly"]), f"crash after write {n}: {names} {json.loads(rec.stdout)}"
        if names == ["data", "data.nightly"]:
            subprocess.run(["btrfs", "subvolume", "delete", str(btrfs_mount / "data.nightly")], check=True, capture_output=True)
    assert tried >= 4
