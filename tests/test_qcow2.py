"""The qcow2 backend on real images, checked with qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu_helpers import chain, make_image, needs_qemu_img, same_data, snapshots, world

from blktx import ActionSpec, Executor, Transaction
from blktx.journal import SqliteJournal
from blktx.plugins import default_registry

pytestmark = needs_qemu_img


def run(directory: Path, actions: list[tuple[str, dict[str, Any]]], **options: Any):
    return Executor(default_registry()).run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(directory))
    )


def group(n: int, name: str = "nightly") -> list[tuple[str, dict[str, Any]]]:
    return [("qcow2.internal-create", {"image": f"d{i}.qcow2", "name": name}) for i in range(n)]


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    for i in range(20):
        make_image(tmp_path / f"d{i}.qcow2", pattern=i + 1, snapshots=("weekly",) if i % 3 == 0 else ())
    make_image(tmp_path / "vm.base.qcow2", pattern=0x77)
    os.symlink("vm.base.qcow2", tmp_path / "vm")
    shutil.copytree(tmp_path, tmp_path.parent / (tmp_path.name + "-pristine"), symlinks=True)
    yield tmp_path


def unchanged(d: Path) -> bool:
    pristine = d.parent / (d.name + "-pristine")
    return (
        world(d) == world(pristine)
        and all(same_data(d / f"d{i}.qcow2", pristine / f"d{i}.qcow2") for i in range(20))
        and same_data(d / "vm", pristine / "vm")
    )


@pytest.mark.parametrize("n", [2, 20])
def test_group_internal_snapshot_commits(images: Path, n: int) -> None:
    result = run(images, group(n))
    assert result.outcome == "committed", result.summary()
    for i in range(20):
        names = [name for _, name in snapshots(images / f"d{i}.qcow2")]
        assert names.count("nightly") == (1 if i < n else 0)


@pytest.mark.parametrize("phase", ["check", "do", "invalidate"])
@pytest.mark.parametrize("n", [2, 20])
def test_fault_at_each_phase_rolls_back_everything(images: Path, n: int, phase: str) -> None:
    actions = [
        *group(n),
        ("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"}),
        ("qcow2.internal-delete", {"image": "d0.qcow2", "name": "weekly"}),
        ("fault", {"phase": phase}),
    ]
    result = run(images, actions)
    assert result.outcome == ("invalid" if phase == "check" else "rolled back"), result.summary()
    assert unchanged(images)


def test_external_snapshot_switches_the_device_atomically(images: Path) -> None:
    result = run(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert result.outcome == "committed"
    assert os.readlink(images / "vm") == "vm.new.qcow2"
    assert chain(images / "vm") == ["vm", "vm.base.qcow2"] or chain(images / "vm")[-1] == "vm.base.qcow2"
    info = subprocess.run(["qemu-img", "info", str(images / "vm.new.qcow2")], capture_output=True, text=True).stdout
    assert "backing file: ./vm.base.qcow2" in info and "backing file format: qcow2" in info
    assert same_data(images / "vm", images / "vm.base.qcow2")


def backing_chain_opens(path: Path) -> bool:
    """Whether QEMU opens ``path``'s whole chain (as a VM given that name would)."""
    return subprocess.run(["qemu-img", "info", "-U", "--backing-chain", str(path)], capture_output=True).returncode == 0


def test_a_device_in_another_folder_than_its_overlay_gets_an_absolute_backing_name(tmp_path: Path) -> None:
    """QEMU opens the overlay through the device and joins a relative backing name to
    the device's folder, not the overlay's: across folders the name must be absolute,
    or the VM could not open (or would open another file as) its backing file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "links").mkdir()
    make_image(tmp_path / "images" / "base.qcow2")
    os.symlink("../images/base.qcow2", tmp_path / "links" / "vm")
    result = run(tmp_path, [("qcow2.external-create", {"device": "links/vm", "overlay": "images/vm.s1.qcow2"})])
    assert result.outcome == "committed", result.summary()
    info = subprocess.run(["qemu-img", "info", str(tmp_path / "images" / "vm.s1.qcow2")], capture_output=True, text=True)
    assert f"backing file: {tmp_path / 'images' / 'base.qcow2'}" in info.stdout, info.stdout
    assert backing_chain_opens(tmp_path / "links" / "vm") and backing_chain_opens(tmp_path / "images" / "vm.s1.qcow2")


def test_a_chain_is_checked_as_qemu_opens_it_through_the_device(tmp_path: Path) -> None:
    """A device in another folder leads to an image whose backing name is relative:
    QEMU joins it to the device's folder, where there is no such file. blktx reads the
    chain the same way, and refuses it, naming that path."""
    (tmp_path / "images").mkdir()
    (tmp_path / "links").mkdir()
    make_image(tmp_path / "images" / "base.qcow2")
    top = tmp_path / "images" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "./base.qcow2", "-F", "qcow2", str(top)], check=True)
    os.symlink("../images/top.qcow2", tmp_path / "links" / "vm")
    assert not backing_chain_opens(tmp_path / "links" / "vm")
    before = world(tmp_path)
    result = run(tmp_path, [("qcow2.external-create", {"device": "links/vm", "overlay": "links/vm.s1.qcow2"})])
    assert result.outcome == "invalid" and world(tmp_path) == before
    assert f"{tmp_path / 'links' / 'base.qcow2'} does not exist" in str(result.problems[0]), result.problems


def test_an_image_in_use_by_a_running_qemu_is_refused_naming_the_process(images: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (Debian qemu-system-x86)")
    vm = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-blockdev",
            f"driver=file,node-name=f0,filename={images / 'd1.qcow2'}",
            "-blockdev",
            "driver=qcow2,node-name=n0,file=f0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        from blktx_plugins._qemu import holder

        while holder(str(images / "d1.qcow2")) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        result = run(images, group(3))
        assert result.outcome == "invalid"
        (problem,) = result.problems
        assert problem.action == 1 and f"is in use by qemu-system-x86_64 (pid {vm.pid})" in problem.message
    finally:
        vm.kill()
        vm.wait()
    assert unchanged(images)


def test_missing_and_non_qcow2_files_are_refused_all_at_once(images: Path) -> None:
    (images / "plain.img").write_bytes(b"\0" * 4096)
    result = run(
        images,
        [
            *group(2),
            ("qcow2.internal-create", {"image": "nope.qcow2", "name": "x"}),
            ("qcow2.internal-create", {"image": "plain.img", "name": "x"}),
        ],
    )
    assert result.outcome == "invalid" and result.exit_status == 2
    messages = {p.action: p.message for p in result.problems}
    assert messages[2].endswith("nope.qcow2 does not exist")
    assert messages[3].endswith("plain.img is not a qcow2 image")
    assert (images / "plain.img").read_bytes() == b"\0" * 4096
    os.unlink(images / "plain.img")
    assert unchanged(images)


def test_existing_snapshot_name_is_refused_without_replace(images: Path) -> None:
    result = run(images, [("qcow2.internal-create", {"image": "d0.qcow2", "name": "weekly"})])
    assert result.outcome == "invalid" and "already has a snapshot named 'weekly' (id 1)" in result.problems[0].message
    assert "replace = true" in (result.problems[0].hint or "")


def test_replace_then_failure_leaves_the_old_snapshot(images: Path) -> None:
    before = snapshots(images / "d0.qcow2")
    result = run(
        images,
        [("qcow2.internal-create", {"image": "d0.qcow2", "name": "weekly", "replace": True}), ("fault", {"phase": "invalidate"})],
    )
    assert result.outcome == "rolled back"
    assert snapshots(images / "d0.qcow2") == before == [("1", "weekly")]


def test_replace_commits_and_deletes_the_old_one_after_the_commit_point(images: Path) -> None:
    result = run(images, [("qcow2.internal-create", {"image": "d0.qcow2", "name": "weekly", "replace": True})])
    assert result.outcome == "committed", result.summary()
    assert snapshots(images / "d0.qcow2") == [("2", "weekly")]


def test_paths_outside_the_spec_directory_are_refused(images: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    make_image(other / "x.qcow2")
    os.symlink(other / "x.qcow2", images / "escape.qcow2")
    result = run(
        images,
        [
            ("qcow2.internal-create", {"image": str(other / "x.qcow2"), "name": "n"}),
            ("qcow2.internal-create", {"image": "escape.qcow2", "name": "n"}),
        ],
    )
    assert result.outcome == "invalid" and len(result.problems) == 2
    assert all("outside the allowed roots" in p.message for p in result.problems)
    assert snapshots(other / "x.qcow2") == []


def test_an_existing_overlay_is_never_overwritten(images: Path) -> None:
    (images / "vm.new.qcow2").write_text("precious")
    result = run(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert result.outcome == "invalid" and "already exists" in result.problems[0].message
    assert (images / "vm.new.qcow2").read_text() == "precious"


def test_full_filesystem_rolls_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        for i in range(3):
            make_image(mnt / f"d{i}.qcow2", size="1M", pattern=i + 1)
        make_image(mnt / "vm.base.qcow2", size="1M")
        os.symlink("vm.base.qcow2", mnt / "vm")
        keep = tmp_path / "keep"
        shutil.copytree(mnt, keep, symlinks=True)
        fd = os.open(mnt / "filler", os.O_CREAT | os.O_WRONLY)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        result = run(mnt, [*group(3), ("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
        assert result.outcome == "rolled back", result.summary()
        assert "No space left" in (result.failure.message if result.failure else "") or "space" in str(result.failure)
        os.unlink(mnt / "filler")
        for i in range(3):
            assert snapshots(mnt / f"d{i}.qcow2") == []
            assert same_data(mnt / f"d{i}.qcow2", keep / f"d{i}.qcow2")
        assert os.readlink(mnt / "vm") == "vm.base.qcow2" and not (mnt / "vm.new.qcow2").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["create", "create", "external", "fault"]), st.integers(0, 3), st.sampled_from(["do", "invalidate"])
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=12, deadline=None)
@given(ACTIONS)
def test_all_or_none_over_real_images(tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, int, str]]) -> None:
    d = tmp_path_factory.mktemp("prop")
    for i in range(4):
        make_image(d / f"d{i}.qcow2", size="1M", pattern=i + 1)
    make_image(d / "vm.base.qcow2", size="1M")
    os.symlink("vm.base.qcow2", d / "vm")
    before = world(d)
    actions: list[tuple[str, dict[str, Any]]] = []
    used: set[Any] = set()
    for kind, i, phase in plan:
        if kind == "create" and (i, "create") not in used:
            used.add((i, "create"))
            actions.append(("qcow2.internal-create", {"image": f"d{i}.qcow2", "name": f"s{len(actions)}"}))
        elif kind == "external" and "vm" not in used:
            used.add("vm")
            actions.append(("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"}))
        elif kind == "fault":
            actions.append(("fault", {"phase": phase}))
    if not actions:
        return
    result = run(d, actions)
    after = world(d)
    if any(t == "fault" for t, _ in actions):
        assert result.outcome == "rolled back" and after == before
    else:
        assert result.outcome == "committed"
        for t, p in actions:
            if t == "qcow2.internal-create":
                assert [n for _, n in after[p["image"]][1]] == [p["name"]]
            else:
                assert after["vm"][1] == "vm.new.qcow2"
    shutil.rmtree(d)


def test_an_overlay_that_appears_after_the_check_is_left_alone(images: Path) -> None:
    """Someone creates the overlay path between check and do: do fails, cancel keeps their file."""
    from blktx.executor import Executor
    from blktx.spec import bind

    registry = default_registry()
    tx = Transaction([ActionSpec("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})], base_dir=str(images))
    actions, options = bind(tx, registry)
    from blktx.context import RunContext

    ctx = RunContext("race", options, str(images), registry.pm.hook)
    executor = Executor(registry)
    assert executor.check_actions(actions, ctx, None) == []
    (images / "vm.new.qcow2").write_text("theirs")
    failures = executor.step("do", actions, ctx)
    assert failures and "appeared after the check" in failures[0].message
    assert executor.step("cancel", actions, ctx) == []
    assert (images / "vm.new.qcow2").read_text() == "theirs"
    assert os.readlink(images / "vm") == "vm.base.qcow2"
    assert not list(images.glob("vm.new.qcow2.blktx-*")), "the temporary overlay is gone"


def test_two_deletes_of_one_snapshot_conflict(images: Path) -> None:
    result = run(
        images,
        [
            ("qcow2.internal-delete", {"image": "d0.qcow2", "name": "weekly"}),
            ("qcow2.internal-delete", {"image": "d0.qcow2", "id": "1"}),
        ],
    )
    assert result.outcome == "invalid"
    assert (
        result.problems[0].action == 1
        and "conflicts with action #0: both delete snapshot 'weekly' (id 1)" in result.problems[0].message
    )
    assert snapshots(images / "d0.qcow2") == [("1", "weekly")]


@pytest.mark.parametrize("replace", [False, True])
def test_a_same_named_snapshot_made_by_someone_else_after_the_check_survives_the_rollback(tmp_path: Path, replace: bool) -> None:
    """Another client makes "nightly" between blktx's check and its do. Fresh: QEMU
    refuses blktx's transaction, and the rollback must not take the other client's
    snapshot for blktx's own. Replace: blktx makes its own (qemu-img allows a second
    of one name), a later action fails, and only blktx's is deleted."""
    from blktx import Event, hookimpl
    from blktx.plugins import load

    make_image(tmp_path / "a.qcow2", snapshots=("nightly",) if replace else ())
    make_image(tmp_path / "b.qcow2")

    class Other:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "phase-start" and event.phase == "do":
                subprocess.run(["qemu-img", "snapshot", "-c", "nightly", str(tmp_path / "a.qcow2")], check=True)

    actions = [
        ActionSpec("qcow2.internal-create", {"image": "a.qcow2", "name": "nightly", "replace": replace}),
        ActionSpec("qcow2.internal-create", {"image": "b.qcow2", "name": "nightly"}),
        ActionSpec("fault", {"phase": "invalidate"}),
    ]
    result = Executor(load(extra=[("other", Other())])).run(Transaction(actions, base_dir=str(tmp_path)))
    assert result.outcome == "rolled back", result.summary()
    if not replace:
        assert result.failure is not None and result.failure.phase == "do"
        assert "already exists" in result.failure.message
    kept = snapshots(tmp_path / "a.qcow2")
    assert [n for _, n in kept] == (["nightly", "nightly"] if replace else ["nightly"])
    assert snapshots(tmp_path / "b.qcow2") == []


def _bound(images: Path, specs: list[tuple[str, dict[str, Any]]]) -> tuple[Any, list[Any], Any]:
    """Bound and checked actions, as a run has them before its do."""
    from blktx.context import RunContext
    from blktx.executor import Executor as Ex
    from blktx.spec import bind

    registry = default_registry()
    actions, options = bind(Transaction([ActionSpec(t, p) for t, p in specs], base_dir=str(images)), registry)
    ctx = RunContext("20260101T000000-0wned000", options, str(images), registry.pm.hook)
    executor = Ex(registry)
    assert executor.check_actions(actions, ctx, None) == []
    return executor, actions, ctx


def test_an_overlay_of_the_same_shape_made_by_someone_else_survives_the_cancel(images: Path) -> None:
    """The run died after its do intent, before do; someone makes the overlay by hand,
    backed by the same image (the shape blktx's would have). Recover's cancel keeps it."""
    executor, actions, ctx = _bound(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "vm.base.qcow2", "-F", "qcow2", str(images / "vm.new.qcow2")],
        check=True,
        capture_output=True,
    )
    theirs = (images / "vm.new.qcow2").stat().st_ino
    actions[0].state = "DOING"  # the journal said it began
    assert executor.step("cancel", actions, ctx) == []
    assert (images / "vm.new.qcow2").stat().st_ino == theirs
    assert os.readlink(images / "vm") == "vm.base.qcow2"


def test_an_overlay_replaced_after_do_is_not_removed_nor_switched_back_to(images: Path) -> None:
    """After do and invalidate, someone replaces the overlay file and re-points the
    device elsewhere: cancel removes neither and leaves the device where they put it."""
    executor, actions, ctx = _bound(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert executor.step("do", actions, ctx) == [] and executor.step("invalidate", actions, ctx) == []
    assert os.readlink(images / "vm") == "vm.new.qcow2"
    os.unlink(images / "vm.new.qcow2")
    (images / "vm.new.qcow2").write_text("theirs")
    make_image(images / "other.qcow2")
    os.symlink("other.qcow2", images / "vm.tmp")
    os.replace(images / "vm.tmp", images / "vm")
    assert executor.step("cancel", actions, ctx) == []
    assert (images / "vm.new.qcow2").read_text() == "theirs"
    assert os.readlink(images / "vm") == "other.qcow2"


def test_cancel_re_points_the_device_only_while_it_points_at_this_runs_overlay(images: Path) -> None:
    """Someone replaced the overlay file (same name, another inode) after invalidate:
    the device does not point at blktx's overlay any more, so it is left alone."""
    executor, actions, ctx = _bound(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert executor.step("do", actions, ctx) == [] and executor.step("invalidate", actions, ctx) == []
    os.unlink(images / "vm.new.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "vm.base.qcow2", "-F", "qcow2", str(images / "vm.new.qcow2")],
        check=True,
        capture_output=True,
    )
    theirs = (images / "vm.new.qcow2").stat().st_ino
    assert executor.step("cancel", actions, ctx) == []
    assert (images / "vm.new.qcow2").stat().st_ino == theirs and os.readlink(images / "vm") == "vm.new.qcow2"


def test_a_file_at_the_old_switch_name_is_never_touched(images: Path) -> None:
    """``vm.blktx-switch`` was blktx's fixed temporary name: a file there is somebody's."""
    for name in ("vm.blktx-switch", "vm.new.qcow2.blktx-switch"):
        (images / name).write_text("mine")
    result = run(
        images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"}), ("fault", {"phase": "invalidate"})]
    )
    assert result.outcome == "rolled back", result.summary()
    result = run(images, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert result.outcome == "committed", result.summary()
    for name in ("vm.blktx-switch", "vm.new.qcow2.blktx-switch"):
        assert (images / name).read_text() == "mine"
    assert not [p.name for p in images.iterdir() if ".blktx-" in p.name and "switch" not in p.name]


def test_a_same_named_snapshot_made_by_hand_after_a_crash_before_do_survives(images: Path) -> None:
    """The run died after its do intent, before do; someone makes "nightly" by hand.
    Recover's cancel must not take it for blktx's: do never started."""
    for replace in (False, True):
        image = images / ("d0.qcow2" if replace else "d1.qcow2")
        if replace:
            subprocess.run(["qemu-img", "snapshot", "-c", "nightly", str(image)], check=True)
        executor, actions, ctx = _bound(
            images, [("qcow2.internal-create", {"image": image.name, "name": "nightly", "replace": replace})]
        )
        subprocess.run(["qemu-img", "snapshot", "-c", "nightly", str(image)], check=True)
        before = snapshots(image)
        actions[0].state = "DOING"
        assert executor.step("cancel", actions, ctx) == []
        assert snapshots(image) == before


def test_a_snapshot_blktx_may_have_made_when_it_died_is_left_and_reported(images: Path) -> None:
    """do had started (durably) but its result never reached the journal: a new
    snapshot of the name cannot be proven blktx's. Cancel leaves it and fails,
    naming it exactly and how to remove it; after that, cancel succeeds."""
    executor, actions, ctx = _bound(images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"})])
    assert executor.step("do", actions, ctx) == []
    (made,) = actions[0].undo["made"]
    del actions[0].undo["made"]  # what the journal holds when blktx died inside do
    failures = executor.step("cancel", actions, ctx)
    assert failures, "an unprovable snapshot was deleted"
    assert f"snapshot 'nightly' (id {made[0]}, made " in failures[0].message
    assert f"qemu-img snapshot -d nightly {images / 'd1.qcow2'}" in failures[0].message
    assert [n for _, n in snapshots(images / "d1.qcow2")] == ["nightly"]
    (left,) = actions[0].type.leftovers(actions[0])
    assert "maybe blktx's" in left.what and f"id {made[0]}" in left.what
    subprocess.run(["qemu-img", "snapshot", "-d", "nightly", str(images / "d1.qcow2")], check=True)
    assert executor.step("cancel", actions, ctx) == []


def test_cancel_deletes_only_the_snapshot_whose_id_and_date_do_recorded(images: Path) -> None:
    """Someone deletes blktx's snapshot and makes another of the name: it gets the same
    id, but another date. Cancel keeps it."""
    executor, actions, ctx = _bound(images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"})])
    assert executor.step("do", actions, ctx) == []
    ((sid, _, _),) = actions[0].undo["made"]
    subprocess.run(["qemu-img", "snapshot", "-d", "nightly", str(images / "d1.qcow2")], check=True)
    time.sleep(0.01)
    subprocess.run(["qemu-img", "snapshot", "-c", "nightly", str(images / "d1.qcow2")], check=True)
    assert snapshots(images / "d1.qcow2") == [(sid, "nightly")]
    assert executor.step("cancel", actions, ctx) == []
    assert snapshots(images / "d1.qcow2") == [(sid, "nightly")]


def test_recover_removes_the_storage_daemon_folders_of_a_killed_run(tmp_path: Path) -> None:
    """SIGKILL during do leaves qemu-storage-daemon's temporary folder; recover's
    blktx_cleanup removes the dead run's (and only those: named for its txid)."""
    import json
    import signal
    import sys
    import tempfile

    # short: the daemon's socket path must stay under 108 bytes
    tmpdir = Path(tempfile.mkdtemp(prefix="bq", dir="/tmp"))
    for i in range(2):
        make_image(tmp_path / f"d{i}.qcow2")
    (tmp_path / "t.toml").write_text(
        "version = 1\n"
        + "".join(f'[[action]]\ntype = "qcow2.internal-create"\nimage = "d{i}.qcow2"\nname = "s"\n' for i in range(2))
    )
    journal = tmp_path / "j.sqlite"
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    foreign = tmpdir / "blktx-qsd-someone-else"
    foreign.mkdir()
    killed = None
    for n in range(1, 10):  # the first journal write inside do: the daemon has started
        out = subprocess.run(
            [sys.executable, "-m", "blktx.cli", "run", str(tmp_path / "t.toml"), "--journal", str(journal), "--json"],
            capture_output=True,
            text=True,
            check=False,
            env={**env, "BLKTX_CRASH_AFTER": str(n)},
        )
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        if [p for p in tmpdir.iterdir() if p != foreign]:
            killed = n
            break
        rec = subprocess.run(
            [sys.executable, "-m", "blktx.cli", "recover", "--journal", str(journal)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert rec.returncode == 0, rec.stdout + rec.stderr
    assert killed is not None, "no run was killed with its daemon's folder there"
    import sqlite3

    (txid,) = sqlite3.connect(journal).execute("SELECT txid FROM tx ORDER BY rowid DESC LIMIT 1").fetchone()
    left = [p.name for p in tmpdir.iterdir() if p != foreign]
    assert left and all(name.startswith(f"blktx-qsd-{txid}-") for name in left), left
    rec = subprocess.run(
        [sys.executable, "-m", "blktx.cli", "recover", "--json", "--journal", str(journal)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert json.loads(rec.stdout)["transactions"][0]["outcome"] == "rolled back"
    assert [p for p in tmpdir.iterdir()] == [foreign], "the dead run's daemon folders are gone; others stay"
    assert snapshots(tmp_path / "d0.qcow2") == []
    shutil.rmtree(tmpdir)


@pytest.mark.parametrize("case", ["inside", "after", "foreign folder", "gone"])
def test_a_snapshot_made_while_blktx_died_is_judged_by_the_daemons_heartbeat(images: Path, case: str) -> None:
    """do started (durably), the result never reached the journal. With the daemon's
    heartbeat file there, a new snapshot of the name dated before its last stamp (+
    interval and margin) is provably blktx's: cancel deletes it. Dated after it, or
    with no trustworthy heartbeat (gone, or a folder others can write), it is left
    and reported."""
    import tempfile

    from blktx_plugins._qemu import HEARTBEAT_INTERVAL, HEARTBEAT_MARGIN, qsd_prefix

    executor, actions, ctx = _bound(images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"})])
    assert executor.step("do", actions, ctx) == []
    undo = actions[0].undo
    (made,) = undo.pop("made")  # what the journal holds when blktx died inside do
    assert not os.path.exists(undo["heartbeat"]), "close removed the daemon's folder"
    folder = tempfile.mkdtemp(prefix=qsd_prefix(ctx.txid))
    try:
        undo["heartbeat"] = beat = os.path.join(folder, "heartbeat")
        Path(beat).touch()
        stamp = made[1] + made[2] / 1e9 + 0.05  # the last stamp just after QEMU dated the snapshot
        if case == "after":
            stamp -= 1.0 + HEARTBEAT_INTERVAL + HEARTBEAT_MARGIN
        os.utime(beat, (stamp, stamp))
        if case == "foreign folder":
            os.chmod(folder, 0o777)
        if case == "gone":
            os.unlink(beat)
        failures = executor.step("cancel", actions, ctx)
        if case == "inside":
            assert failures == [] and snapshots(images / "d1.qcow2") == []
        else:
            assert failures and "cannot be proven" in failures[0].message, failures
            assert snapshots(images / "d1.qcow2") == [(made[0], "nightly")]
    finally:
        shutil.rmtree(folder)


# -- hostile images (docs/security.md) -----------------------------------------------------


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    import struct

    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


def _snap_table(path: Path) -> int:
    import struct

    with open(path, "rb") as fh:
        fh.seek(64)
        return int(struct.unpack(">Q", fh.read(8))[0])


@pytest.mark.parametrize("craft", ["snapshots", "backing name", "extra data", "l1 table", "refcount table", "cluster bits"])
def test_a_crafted_header_beyond_qemus_limits_is_refused_at_check(tmp_path: Path, craft: str) -> None:
    """A header QEMU would refuse is refused at check, naming the file and the limit,
    and blktx neither allocates nor reads without bound."""
    image = make_image(tmp_path / "d0.qcow2", snapshots=("weekly",))
    if craft == "snapshots":
        _patch(image, 60, ">I", 70_000)
    elif craft == "backing name":
        _patch(image, 8, ">Q", 0x200)
        _patch(image, 16, ">I", 5000)
    elif craft == "extra data":
        _patch(image, _snap_table(image) + 36, ">I", 1 << 30)
    elif craft == "l1 table":
        _patch(image, 36, ">I", 0xFFFFFFFF)
    elif craft == "refcount table":
        _patch(image, 56, ">I", 0xFFFFFFFF)
    else:
        _patch(image, 20, ">I", 40)
    t0 = time.monotonic()
    result = run(tmp_path, [("qcow2.internal-create", {"image": "d0.qcow2", "name": "nightly"})])
    assert time.monotonic() - t0 < 10
    assert result.outcome == "invalid", result.summary()
    message = result.problems[0].message
    assert str(image) in message and "QEMU refuses such an image" in message, message


def test_a_fifo_in_place_of_an_image_is_refused_not_waited_for(tmp_path: Path) -> None:
    import sys

    os.mkfifo(tmp_path / "d0.qcow2")
    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "d0.qcow2"\nname = "s"\n')
    out = subprocess.run(
        [sys.executable, "-m", "blktx.cli", "check", str(tmp_path / "t.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "COLUMNS": "500"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is not a regular file (a FIFO" in out.stdout + out.stderr, out.stdout


def test_a_snapshot_name_that_is_not_utf8_is_data_not_a_crash(images: Path) -> None:
    """QEMU allows any bytes in a name: checks, runs, deletes by id and messages keep
    working, and the name is shown escaped."""
    image = images / "d1.qcow2"
    subprocess.run([b"qemu-img", b"snapshot", b"-c", b"caf\xe9", os.fsencode(image)], check=True)
    result = run(
        images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"}), ("fault", {"phase": "invalidate"})]
    )
    assert result.outcome == "rolled back", result.summary()
    result = run(images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"})])
    assert result.outcome == "committed", result.summary()
    result = run(images, [("qcow2.internal-delete", {"image": "d1.qcow2", "name": "missing"})])
    assert result.outcome == "invalid" and "1:'caf\\xe9'" in result.problems[0].message, result.problems
    result = run(images, [("qcow2.internal-delete", {"image": "d1.qcow2", "id": "1"})])
    assert result.outcome == "committed", result.summary()
    assert [n for _, n in snapshots(image)] == ["nightly"]


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 256, "caf\udce9"])
def test_a_snapshot_name_qemu_would_refuse_or_cut_is_refused_at_check(images: Path, name: str) -> None:
    result = run(images, [("qcow2.internal-create", {"image": "d1.qcow2", "name": name})])
    assert result.outcome == "invalid", result.summary()
    message = result.problems[0].message
    assert f"qcow2.internal-create action #0 on {images / 'd1.qcow2'}: the snapshot name" in message, message
    assert snapshots(images / "d1.qcow2") == []


@pytest.mark.parametrize(
    "backing",
    [
        "nbd:127.0.0.1:10809",
        'json:{"driver": "raw", "file": {"driver": "file", "filename": "/etc/shadow"}}',
        "/etc/hostname",
        "outside",
        "deep",
    ],
)
@pytest.mark.parametrize("kind", ["qcow2.internal-create", "qcow2.external-create"])
def test_a_backing_chain_through_a_protocol_or_outside_the_roots_is_refused_at_check(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, backing: str, kind: str
) -> None:
    """Each backing name of the whole chain is read by blktx and must be a file under
    the roots: QEMU is never asked to open it."""
    spec = tmp_path / "spec"
    spec.mkdir()
    fmt = "raw"
    if backing in ("outside", "deep"):
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        make_image(elsewhere / "base.qcow2")
        deep = backing == "deep"
        backing, fmt = str(elsewhere / "base.qcow2"), "qcow2"
    else:
        deep = False
    top = spec / "d0.qcow2"
    if deep:
        # the first link is inside the roots; the next one leaves them
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, str(spec / "mid.qcow2"), "16M"],
            check=True,
        )
        backing, fmt = "./mid.qcow2", "qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, str(top), "16M"], check=True)
    if kind == "qcow2.internal-create":
        result = run(spec, [(kind, {"image": "d0.qcow2", "name": "nightly"})])
    else:
        os.symlink("d0.qcow2", spec / "vm")
        result = run(spec, [(kind, {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert result.outcome == "invalid", result.summary()
    assert "[rule confined-paths]" in result.problems[0].message, result.problems[0].message
    from blktx_plugins._image import read_header  # qemu-img itself would open the chain to list them

    assert read_header(str(top))[1] == [] and not (spec / "vm.new.qcow2").exists()


def test_an_overlay_names_its_backing_file_so_that_no_folder_reads_as_a_protocol(tmp_path: Path) -> None:
    """The current image lies in a folder named like a protocol (``nbd:x``): the
    overlay's backing name starts with ``./`` and carries its format, so QEMU opens
    the file rather than connecting anywhere."""
    folder = tmp_path / "nbd:x"
    folder.mkdir()
    make_image(folder / "base.qcow2", pattern=0x42)
    os.symlink("nbd:x/base.qcow2", tmp_path / "vm")
    result = run(tmp_path, [("qcow2.external-create", {"device": "vm", "overlay": "vm.new.qcow2"})])
    assert result.outcome == "committed", result.summary()
    info = subprocess.run(
        ["qemu-img", "info", "-U", str(tmp_path / "vm.new.qcow2")], capture_output=True, text=True, check=True
    ).stdout
    assert "backing file: ./nbd:x/base.qcow2" in info and "backing file format: qcow2" in info, info
    assert same_data(tmp_path / "vm", folder / "base.qcow2")


def test_an_image_swapped_after_the_check_is_not_touched(images: Path) -> None:
    """Between the check and do, someone renames another image over the checked one:
    blktx re-verifies the identity before QEMU opens anything and acts on neither."""
    from blktx import Event, hookimpl
    from blktx.plugins import load

    make_image(images / "other.qcow2", pattern=0x55)

    class Swap:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "phase-start" and event.phase == "do":
                os.replace(images / "other.qcow2", images / "d1.qcow2")

    actions = [
        ActionSpec("qcow2.internal-create", {"image": "d1.qcow2", "name": "nightly"}),
        ActionSpec("qcow2.internal-create", {"image": "d2.qcow2", "name": "nightly"}),
    ]
    result = Executor(load(extra=[("swap", Swap())])).run(Transaction(actions, base_dir=str(images)))
    assert result.outcome == "rolled back", result.summary()
    assert result.failure is not None and "replaced by another file since the check" in result.failure.message
    assert snapshots(images / "d1.qcow2") == [] and snapshots(images / "d2.qcow2") == []


def test_the_storage_daemon_does_not_open_the_backing_chain(tmp_path: Path) -> None:
    """Internal snapshots need no backing chain: the daemon opens the image with
    ``backing: null``. Here a running QEMU writes to the backing file (holding its
    write lock); opening the chain would fail on that lock."""
    from qemu_helpers import VM

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    vm = VM(tmp_path, "vm", drives=1)
    try:
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "./vm-d0.qcow2",
                "-F",
                "qcow2",
                str(tmp_path / "top.qcow2"),
                "16M",
            ],
            check=True,
        )
        result = run(tmp_path, [("qcow2.internal-create", {"image": "top.qcow2", "name": "nightly"})])
        assert result.outcome == "committed", result.summary()
        from blktx_plugins._image import read_header

        assert [s.name for s in read_header(str(tmp_path / "top.qcow2"))[1]] == ["nightly"]
    finally:
        vm.quit()


@needs_qemu_img
def test_two_devices_writing_one_overlay_are_refused_at_check(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_image(tmp_path / f"{name}.base.qcow2", size="1M")
        os.symlink(f"{name}.base.qcow2", tmp_path / name)
    before = world(tmp_path)
    result = run(
        tmp_path,
        [
            ("qcow2.external-create", {"device": "a", "overlay": "new.qcow2"}),
            ("qcow2.external-create", {"device": "b", "overlay": "./new.qcow2"}),
        ],
    )
    assert result.outcome == "invalid"
    (problem,) = result.problems
    assert problem.action == 1 and f"creates {tmp_path / 'new.qcow2'}, as action #0" in problem.message
    assert world(tmp_path) == before


# -- the VM clock of an offline snapshot (issue 17 item 8) ------------------------------------


def qemu_snapshots(path: Path) -> dict[str, dict[str, Any]]:
    """Each snapshot of ``path`` by name, as QEMU lists it (``qemu-img info
    --output=json``: this qemu-img's ``snapshot -l`` has no JSON output)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True)
    return {s["name"]: s for s in json.loads(out.stdout).get("snapshots", [])}


@pytest.mark.parametrize("jobs", [1, 3])
def test_an_offline_internal_snapshot_records_vm_clock_0_as_qemu_img_does(tmp_path: Path, jobs: int) -> None:
    """qemu-storage-daemon records the host's clock as a snapshot's VM clock
    (``qemu-img snapshot -l`` showed some 498,000 hours); once blktx's daemons have
    exited it writes 0 there, as ``qemu-img snapshot -c`` records: in exactly the
    snapshots the run made, their id, name and date those the journal keeps."""
    n = 24  # with jobs = 3, three daemons: each one's images patched in its own thread
    for i in range(n):
        make_image(tmp_path / f"d{i}.qcow2", size="1M", snapshots=("weekly",) if i % 5 == 0 else ())
    # somebody else's snapshot, with a VM clock of its own (2 h and 123 ns): left alone
    _patch(tmp_path / "d0.qcow2", _snap_table(tmp_path / "d0.qcow2") + 24, ">Q", 7_200_000_000_123)
    spec = tmp_path / "t.toml"
    spec.write_text(
        f"version = 1\n[options]\njobs = {jobs}\n"
        + "".join(f'[[action]]\ntype = "qcow2.internal-create"\nimage = "d{i}.qcow2"\nname = "nightly"\n' for i in range(n))
    )
    journal = tmp_path / "journal.sqlite"
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "run", str(spec), "--journal", str(journal)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (entry,) = SqliteJournal(str(journal)).group_snapshots()
    made = {m["target"]: m["identity"]["made"] for m in entry["members"]}
    for i in range(n):
        image = tmp_path / f"d{i}.qcow2"
        snaps = qemu_snapshots(image)
        ours = snaps["nightly"]
        assert (ours["vm-clock-sec"], ours["vm-clock-nsec"]) == (0, 0), ours
        assert made[str(image)] == [[ours["id"], ours["date-sec"], ours["date-nsec"]]], "id, name and date unchanged"
        if i == 0:
            assert (snaps["weekly"]["vm-clock-sec"], snaps["weekly"]["vm-clock-nsec"]) == (7200, 123)
        elif i % 5 == 0:
            assert (snaps["weekly"]["vm-clock-sec"], snaps["weekly"]["vm-clock-nsec"]) == (0, 0)
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, check=False)
        assert check.returncode == 0 and "No errors were found on the image." in check.stdout, check.stdout + check.stderr


def test_a_vm_clock_that_cannot_be_written_fails_nothing(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM clock is cosmetic: a failure to write it neither fails nor rolls back the run."""
    from blktx_plugins import _daemons

    def fail(*_: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_daemons, "zero_vm_clocks", fail)
    result = run(images, group(20))
    assert result.outcome == "committed", result.summary()
    assert all("nightly" in qemu_snapshots(images / f"d{i}.qcow2") for i in range(20))


@pytest.mark.parametrize("overlay", ["images/vm.s1.qcow2", "links/vm.s1.qcow2"])
def test_an_overlay_keeps_the_current_images_relative_backing_name_meaning_what_it_meant(tmp_path: Path, overlay: str) -> None:
    """The device in links/ leads to images/top.qcow2, whose backing name ./b0.qcow2 QEMU
    joins to links/ (the folder of the name it opened top by). Once the overlay names top
    (absolutely, or ./../images/top.qcow2), QEMU opens top by another name and joins
    ./b0.qcow2 to images/: another file, one the check never confined. Refused, or the
    guest would see other data after the commit."""
    (tmp_path / "images").mkdir()
    (tmp_path / "links").mkdir()
    make_image(tmp_path / "links" / "b0.qcow2", pattern=0x11)
    make_image(tmp_path / "images" / "b0.qcow2", pattern=0x77)
    top = tmp_path / "images" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "./b0.qcow2", "-F", "qcow2", str(top)], check=True)
    os.symlink("../images/top.qcow2", tmp_path / "links" / "vm")

    def guest_sees(pattern: int) -> bool:
        cmd = ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} 0 1M", str(tmp_path / "links" / "vm")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.returncode == 0 and "verification failed" not in out.stdout + out.stderr

    assert guest_sees(0x11)
    result = run(tmp_path, [("qcow2.external-create", {"device": "links/vm", "overlay": overlay})])
    assert result.outcome == "invalid" or guest_sees(0x11), result.summary()
