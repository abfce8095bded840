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
    return Executor(default_registry()).run(Transaction([ActionSpec(t, p) for t, p in actions], base_dir=str(base)),
                                            **kw)


def test_snapshot_appears_readonly_and_cancel_removes_only_it(btrfs_mount: Path) -> None:
    result = run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "data.nightly"})])
    assert result.outcome == "committed", result.summary()
    assert subvolumes(btrfs_mount) == ["data", "data.nightly"]
    assert (btrfs_mount / "data.nightly" / "file").read_text() == "precious"
    ro = subprocess.run(["btrfs", "property", "get", str(btrfs_mount / "data.nightly"), "ro"],
                        capture_output=True, text=True).stdout
    assert "ro=true" in ro
    result = run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "data.hourly", "readonly": False}),
                               ("fault", {"phase": "invalidate"})])
    assert result.outcome == "rolled back"
    assert subvolumes(btrfs_mount) == ["data", "data.nightly"]


def test_refusals(btrfs_mount: Path) -> None:
    (btrfs_mount / "plain").mkdir()
    result = run(btrfs_mount, [("btrfs.snapshot", {"source": "plain", "dest": "x"}),
                               ("btrfs.snapshot", {"source": "data", "dest": "data"}),
                               ("btrfs.delete", {"path": "plain"})])
    assert result.outcome == "invalid"
    messages = [p.message for p in result.problems]
    assert messages[0].endswith("plain is not a btrfs subvolume") and messages[1].endswith("data already exists")
    assert messages[2].endswith("plain is not a btrfs subvolume")
    assert subvolumes(btrfs_mount) == ["data"]


def test_delete_is_a_finalize_step(btrfs_mount: Path) -> None:
    assert run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "old"})]).outcome == "committed"
    result = run(btrfs_mount, [("btrfs.delete", {"path": "old"}), ("fault", {"phase": "do"})])
    assert result.outcome == "rolled back" and subvolumes(btrfs_mount) == ["data", "old"]
    result = run(btrfs_mount, [("btrfs.delete", {"path": "old"}),
                               ("btrfs.snapshot", {"source": "data", "dest": "new"})])
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
        ("exec", {"target": "lvm:vg0/root", "do": [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
                  "cancel": [sys.executable, "-c",
                             f"import os; os.path.exists({str(marker)!r}) and os.unlink({str(marker)!r})"]}),
        ("exec", {"target": "array", "do": [sys.executable, "-c", "import sys; sys.exit('array offline')"],
                  "cancel": [sys.executable, "-c", "pass"]}),
    ]
    actions[3:3] = [("qmp.internal-create", {"vm": str(vm.sock), "drive": "drive0", "name": "nightly"}),
                    ("qmp.external-create", {"vm": str(vm.sock), "drive": "drive1", "overlay": str(base / "vm1.ov.qcow2")})]
    try:
        result = run(base, actions, allow_exec=True, roots=[str(btrfs_mount)], overrides={"quiesce": "pause"})
        assert result.outcome == "rolled back", result.summary()
        assert vm.snapshots(0) == [] and vm.active_file(1) == "vm1-d1.qcow2" and vm.running()
        assert len(result.holds) == 1 and result.holds[0].window is not None
    finally:
        vm.quit()
    assert "array offline" in result.failure.message
    assert world(base) == before_images
    assert snapshots(base / "d0.qcow2") == [] and not marker.exists()
    assert subvolumes(btrfs_mount) == ["data"]
