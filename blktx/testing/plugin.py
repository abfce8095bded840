"""blktx's pytest plugin (entry point ``pytest11``): fixtures for real components.

- ``blktx_registry``: the installed plugins' registry.
- ``qcow2_image``: makes a real qcow2 image, ``qcow2_image("disk.qcow2", size="16M",
  pattern=0x41, snapshots=("weekly",))``; skips (naming the package) without qemu-img.
- ``live_vm``: starts ``qemu-system-x86_64 -machine none`` with qcow2 drives and a QMP
  socket, ``live_vm("vm1", drives=2, paused=False)``; quits every VM afterwards.
- ``btrfs_mount``: a loop-mounted btrfs with a subvolume ``data`` (root only).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blktx.testing.fixtures import VM, btrfs_mount, make_image  # noqa: F401 - btrfs_mount is a fixture


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Properties that do not apply to a type (cancel of a finalize type, foreign
    objects of a type that makes none) are not collected, rather than passing empty."""
    from blktx.testing.conformance import ActionTypeConformance

    keep, dropped = [], []
    for item in items:
        cls = getattr(item, "cls", None)
        name = getattr(item, "originalname", None) or item.name
        if cls is not None and issubclass(cls, ActionTypeConformance) and cls.type_name and cls.not_applicable(name) is not None:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def blktx_registry() -> Any:
    from blktx.plugins import default_registry

    return default_registry()


@pytest.fixture
def qcow2_image(tmp_path: Path) -> Callable[..., Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img (Debian qemu-utils)")

    def make(name: str, size: str = "16M", pattern: int | None = None, snapshots: tuple[str, ...] = ()) -> Path:
        return make_image(tmp_path / name, size, pattern, snapshots)

    return make


@pytest.fixture
def live_vm(tmp_path: Path) -> Iterator[Callable[..., VM]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (Debian qemu-system-x86)")
    started: list[VM] = []

    def start(name: str = "vm", drives: int = 2, paused: bool = False) -> VM:
        vm = VM(tmp_path, name, drives=drives, paused=paused)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.quit()
