"""Every built-in action type passes blktx.testing's conformance suite (on real components)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, make_image, needs_qemu_img, needs_qemu_system, run, subvolumes, world

from blktx.testing import ActionTypeConformance
from blktx_plugins.sim import make_world, read_world


class SimBase(ActionTypeConformance):
    def setup_world(self, base: Path) -> dict[str, Any]:
        make_world(
            str(base / "sim-world.json"),
            {"a": {"snapshots": {"1": "old"}, "layers": ["a0"], "active": "a0", "data": "now", "saved": {"1": "then"}}},
        )
        return self.params()

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def observe(self, base: Path) -> Any:
        return read_world(str(base / "sim-world.json"))


class TestSimSnapshot(SimBase):
    type_name = "sim.snapshot"

    def params(self) -> dict[str, Any]:
        return {"device": "a", "name": "n"}

    def change(self, base: Path) -> None:
        from blktx_plugins.sim import _write

        data = read_world(str(base / "sim-world.json"))
        data["devices"]["a"]["data"] = "changed"
        _write(str(base / "sim-world.json"), data)

    def observe_data(self, base: Path) -> Any:
        return read_world(str(base / "sim-world.json"))["devices"]["a"]["data"]

    def make_foreign(self, base: Path, action: Any) -> bool:
        from blktx_plugins.sim import _write

        data = read_world(str(base / "sim-world.json"))
        data["devices"]["a"]["snapshots"]["9"] = "n"  # somebody else's snapshot of the same name
        _write(str(base / "sim-world.json"), data)
        return True


class TestSimOverlay(SimBase):
    type_name = "sim.overlay"

    def params(self) -> dict[str, Any]:
        return {"device": "a", "layer": "a1"}

    def make_foreign(self, base: Path, action: Any) -> bool:
        from blktx_plugins.sim import _write

        data = read_world(str(base / "sim-world.json"))
        data["devices"]["a"]["layers"].append("a1")  # somebody else's layer of the same name
        _write(str(base / "sim-world.json"), data)
        return True


class TestSimDelete(SimBase):
    type_name = "sim.delete"

    def params(self) -> dict[str, Any]:
        return {"device": "a", "name": "old"}


class TestSimRevert(SimBase):
    type_name = "sim.revert"
    foreign = False  # it makes no object of its own: it changes the device's data

    def params(self) -> dict[str, Any]:
        return {"device": "a", "id": 1, "name": "old"}


class TestSimNoop(ActionTypeConformance):
    type_name = "sim.noop"
    changes_world = False

    def setup_world(self, base: Path) -> dict[str, Any]:
        return {"key": "k"}

    def observe(self, base: Path) -> Any:
        return sorted(os.listdir(base))


class Qcow2Base(ActionTypeConformance):
    #: The image or device users read and write (for the revert properties).
    data = "d.qcow2"

    def observe(self, base: Path) -> Any:
        return world(base)

    def change(self, base: Path) -> None:
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 64k", str(base / self.data))

    def observe_data(self, base: Path) -> Any:
        """What the guest sees through the image or device: its raw content."""
        raw = base.parent / (base.name + ".raw")
        run("qemu-img", "convert", "-O", "raw", str(base / self.data), str(raw))
        try:
            return hashlib.sha256(raw.read_bytes()).hexdigest()
        finally:
            raw.unlink()


@needs_qemu_img
class TestQcow2InternalCreate(Qcow2Base):
    type_name = "qcow2.internal-create"

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "d.qcow2", pattern=0x41, snapshots=("old",))
        return {"image": "d.qcow2", "name": "new"}

    def make_foreign(self, base: Path, action: Any) -> bool:
        run("qemu-img", "snapshot", "-c", "new", str(base / "d.qcow2"))
        return True


@needs_qemu_img
class TestQcow2InternalCreateReplace(Qcow2Base):
    type_name = "qcow2.internal-create"

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "d.qcow2", pattern=0x41, snapshots=("nightly",))
        return {"image": "d.qcow2", "name": "nightly", "replace": True}

    def make_foreign(self, base: Path, action: Any) -> bool:
        run("qemu-img", "snapshot", "-c", "nightly", str(base / "d.qcow2"))
        return True


@needs_qemu_img
class TestQcow2InternalDelete(Qcow2Base):
    type_name = "qcow2.internal-delete"

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "d.qcow2", snapshots=("old", "keep"))
        return {"image": "d.qcow2", "name": "old"}


@needs_qemu_img
class TestQcow2ExternalCreate(Qcow2Base):
    type_name = "qcow2.external-create"
    data = "vm"

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "vm.base.qcow2", pattern=0x42)
        os.symlink("vm.base.qcow2", base / "vm")
        return {"device": "vm", "overlay": "vm.new.qcow2"}

    def make_foreign(self, base: Path, action: Any) -> bool:
        # the very shape blktx's overlay has: backed by the current image
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "vm.base.qcow2", "-F", "qcow2", str(base / "vm.new.qcow2"))
        return True


class TestExec(ActionTypeConformance):
    type_name = "exec"
    allow_exec = True
    foreign = False  # what its commands make is the spec's business, not the plugin's

    def setup_world(self, base: Path) -> dict[str, Any]:
        made = str(base / "lv")
        return {
            "target": "lvm:vg0/lv",
            "do": [sys.executable, "-c", f"open({made!r}, 'w').close()"],
            "cancel": [sys.executable, "-c", f"import os; os.path.exists({made!r}) and os.unlink({made!r})"],
        }

    def observe(self, base: Path) -> Any:
        return sorted(os.listdir(base))


@pytest.fixture(scope="module")
def shared_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
        pytest.skip("needs root and mkfs.btrfs (Debian btrfs-progs)")
    d = tmp_path_factory.mktemp("btrfs")
    with open(d / "img", "wb") as fh:
        fh.truncate(256 << 20)
    run("mkfs.btrfs", "-q", str(d / "img"))
    (d / "mnt").mkdir()
    run("mount", "-o", "loop", str(d / "img"), str(d / "mnt"))
    yield d / "mnt"
    subprocess.run(["umount", str(d / "mnt")], check=False)


class BtrfsBase(ActionTypeConformance):
    mnt: Path

    @pytest.fixture(autouse=True)
    def _mounted(self, shared_btrfs: Path) -> None:
        self.mnt = shared_btrfs
        self.worlds: dict[Path, str] = {}

    def roots(self, base: Path) -> list[str]:
        return [str(self.mnt)]

    def observe(self, base: Path) -> Any:
        """This world's subvolumes on the shared mount, its random name written {world}:
        two fresh worlds compare equal."""
        name = self.worlds.get(base)
        subs = subvolumes(self.mnt)
        return subs if name is None else [repr(s).replace(name, "{world}") for s in subs if name in repr(s)]


class TestBtrfsSnapshot(BtrfsBase):
    type_name = "btrfs.snapshot"

    def setup_world(self, base: Path) -> dict[str, Any]:
        src = self.mnt / f"src-{uuid.uuid4().hex[:8]}"
        self.worlds[base] = src.name
        run("btrfs", "subvolume", "create", str(src))
        return {"source": str(src), "dest": f"{src}.snap"}

    def make_foreign(self, base: Path, action: Any) -> bool:
        run("btrfs", "subvolume", "snapshot", action.params["source"], action.params["dest"])
        return True


class TestBtrfsDelete(BtrfsBase):
    type_name = "btrfs.delete"

    def setup_world(self, base: Path) -> dict[str, Any]:
        sub = self.mnt / f"old-{uuid.uuid4().hex[:8]}"
        self.worlds[base] = sub.name
        run("btrfs", "subvolume", "create", str(sub))
        return {"path": str(sub)}


class QmpBase(ActionTypeConformance):
    vm: VM | None = None

    @pytest.fixture(autouse=True)
    def _vm(self, tmp_path: Path) -> Iterator[None]:
        self.vm = None
        self.dir = tmp_path
        yield
        if self.vm is not None:
            self.vm.quit()

    def fresh(self, base: Path) -> None:
        """One VM per world: a property that makes several worlds gets a clean VM for each."""
        if self.vm is not None and self.dir != base:
            self.vm.quit()
            self.vm = None
        self.dir = base

    def started(self, snapshots: tuple[str, ...] = ()) -> VM:
        if self.vm is None:
            self.vm = VM(self.dir, "vm", drives=1)
            for name in snapshots:
                self.vm.qmp("blockdev-snapshot-internal-sync", {"device": "drive0", "name": name})
        return self.vm

    def roots(self, base: Path) -> list[str]:
        return [str(self.dir)]

    def observe(self, base: Path) -> Any:
        vm = self.started()
        return vm.snapshots(0), vm.active_file(0), sorted(p.name for p in self.dir.glob("*.qcow2"))


@needs_qemu_system
@needs_qemu_img
class TestQmpInternalCreate(QmpBase):
    type_name = "qmp.internal-create"

    def setup_world(self, base: Path) -> dict[str, Any]:
        self.fresh(base)
        return {"vm": str(self.started().sock), "drive": "drive0", "name": "nightly"}

    def make_foreign(self, base: Path, action: Any) -> bool:
        self.started().qmp("blockdev-snapshot-internal-sync", {"device": "drive0", "name": "nightly"})
        return True


@needs_qemu_system
@needs_qemu_img
class TestQmpInternalDelete(QmpBase):
    type_name = "qmp.internal-delete"

    def setup_world(self, base: Path) -> dict[str, Any]:
        self.fresh(base)
        return {"vm": str(self.started(("old",)).sock), "drive": "drive0", "name": "old"}


@needs_qemu_system
@needs_qemu_img
class TestQmpExternalCreate(QmpBase):
    type_name = "qmp.external-create"

    def setup_world(self, base: Path) -> dict[str, Any]:
        self.fresh(base)
        return {"vm": str(self.started().sock), "drive": "drive0", "overlay": str(self.dir / "ov.qcow2")}

    def make_foreign(self, base: Path, action: Any) -> bool:
        make_image(self.dir / "ov.qcow2", size="1M")  # somebody else's file at the overlay's name
        return True
