"""``blktx revert`` / ``blktx delete`` of qcow2 group snapshots (qcow2.internal-revert,
qcow2.internal-delete by identity) on real images, through the CLI; data read back
with qemu-io, images checked with qemu-img."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import make_image, needs_qemu_img, run, snapshots, world

from blktx.cli import main
from blktx.testing import ActionTypeConformance
from blktx_plugins import _qcow2_revert
from blktx_plugins._qemu import holder

pytestmark = needs_qemu_img

SPEC = """version = 1
group = "app"
snapshot = "s1"
""" + "".join(f'[[action]]\ntype = "qcow2.internal-create"\nimage = "d{i}.qcow2"\n' for i in range(3))

IMAGES = [f"d{i}.qcow2" for i in range(3)]
NEW = 9  # the pattern written after the group snapshot


def write(img: Path, pattern: int) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(img))


def holds(img: Path, pattern: int) -> bool:
    out = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} 0 1M", str(img)], capture_output=True, text=True
    )
    return out.returncode == 0 and "verification failed" not in out.stdout + out.stderr


def clean(img: Path) -> bool:
    return subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True).returncode == 0


def digest(img: Path) -> str:
    """What the guest sees, hashed (qemu-img convert to raw)."""
    fd, raw = tempfile.mkstemp(suffix=".raw")
    os.close(fd)
    try:
        run("qemu-img", "convert", "-U", "-O", "raw", str(img), raw)
        return hashlib.sha256(Path(raw).read_bytes()).hexdigest()
    finally:
        os.unlink(raw)


def state(folder: Path) -> dict[str, Any]:
    """Every image's snapshot list and data."""
    return {name: (snapshots(folder / name), digest(folder / name)) for name in IMAGES}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    status = main([*args, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out) if out.strip() else {}


def make_group(folder: Path, capsys: pytest.CaptureFixture[str], *journal: str) -> None:
    """Three images holding patterns 1, 2, 3; the group snapshot app@s1 of them; then
    pattern NEW written over each."""
    for i, name in enumerate(IMAGES):
        make_image(folder / name, size="4M", pattern=i + 1)
    (folder / "app.toml").write_text(SPEC)
    status, result = cli(capsys, "run", str(folder / "app.toml"), *journal)
    assert status == 0, result
    for name in IMAGES:
        assert snapshots(folder / name) == [("1", "s1")]
        write(folder / name, NEW)


@pytest.fixture
def app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    make_group(tmp_path, capsys)
    return tmp_path


def safety_snapshots(img: Path) -> list[tuple[str, str]]:
    return [s for s in snapshots(img) if s[1].startswith("blktx-before-revert-")]


# -- (a) revert -------------------------------------------------------------------------


def test_revert_brings_every_image_back_and_removes_the_safety_snapshots(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 0 and result["outcome"] == "committed", result
    assert [a["type"] for a in result["actions"]] == ["qcow2.internal-revert"] * 3
    for i, name in enumerate(IMAGES):
        assert holds(app / name, i + 1), f"{name} does not hold the group snapshot's data"
        assert clean(app / name)
        assert snapshots(app / name) == [("1", "s1")], "the group snapshot stays; no safety snapshot is left"
    # reverted again: the same point in time once more
    for name in IMAGES:
        write(app / name, NEW)
    assert cli(capsys, "revert", "app@s1")[0] == 0
    assert all(holds(app / name, i + 1) for i, name in enumerate(IMAGES))


def test_a_snapshot_named_like_the_members_id_is_not_the_one_applied(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``qemu-img snapshot -a`` takes an id or a name; blktx passes the id, which QEMU
    looks up first: a snapshot *named* "1" made by hand (holding other data) is not
    applied, and stays."""
    run("qemu-img", "snapshot", "-c", "1", str(app / "d0.qcow2"))  # id 2, name "1", holds NEW
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 0, result
    assert holds(app / "d0.qcow2", 1)
    assert snapshots(app / "d0.qcow2") == [("1", "s1"), ("2", "1")]


def test_an_image_with_a_backing_file_is_reverted_without_opening_its_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """qemu-img is given the checked file's descriptor: a relative backing name would
    resolve under /proc/self/fd, so the chain is not opened (a snapshot's clusters
    are the image's own); the backing file stays recorded as it was."""
    make_image(tmp_path / "base.qcow2", size="4M", pattern=5)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "./base.qcow2", "-F", "qcow2", str(tmp_path / "ov.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 6 0 64k", str(tmp_path / "ov.qcow2"))
    (tmp_path / "vm.toml").write_text(
        'version = 1\ngroup = "vm"\nsnapshot = "s1"\n[[action]]\ntype = "qcow2.internal-create"\nimage = "ov.qcow2"\n'
    )
    assert cli(capsys, "run", str(tmp_path / "vm.toml"))[0] == 0
    write(tmp_path / "ov.qcow2", NEW)
    status, result = cli(capsys, "revert", "vm@s1")
    assert status == 0, result
    # its own 64k of 6 back, the rest of the first MiB read through from the backing file
    out = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 6 0 64k", "-c", "read -P 5 64k 960k", str(tmp_path / "ov.qcow2")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "verification failed" not in out.stdout, out.stdout
    info = run("qemu-img", "info", "-U", str(tmp_path / "ov.qcow2"))
    assert "backing file: ./base.qcow2" in info and clean(tmp_path / "ov.qcow2")
    assert snapshots(tmp_path / "ov.qcow2") == [("1", "s1")]


# -- (b) --keep-current ------------------------------------------------------------------


def test_keep_current_keeps_the_state_before_the_revert_and_names_it(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, result = cli(capsys, "revert", "--keep-current", "app@s1")
    assert status == 0, result
    safety = f"blktx-before-revert-{result['txid']}"
    for i, name in enumerate(IMAGES):
        assert holds(app / name, i + 1)
        assert snapshots(app / name) == [("1", "s1"), ("2", safety)]
        assert clean(app / name)
    outputs = [a.get("output", "") for a in result["actions"]]
    assert all(f"kept the state before the revert as snapshot {safety} (id 2" in o for o in outputs), outputs
    # the kept state is a group snapshot of its own, listed and complete
    status, listing = cli(capsys, "list", "app", "--verify")
    (kept,) = [e for e in listing["group_snapshots"] if e["name"] == f"before-revert-{result['txid']}"]
    assert kept["state"] == "complete" and [m["params"]["name"] for m in kept["members"]] == [safety] * len(IMAGES)
    # going back to it brings the state before the revert back, everywhere
    status, again = cli(capsys, "revert", f"app@{kept['name']}")
    assert status == 0, again
    assert all(holds(app / name, NEW) for name in IMAGES)
    # and deleting it removes exactly those safety snapshots (by id and date)
    status, gone = cli(capsys, "delete", f"app@{kept['name']}")
    assert status == 0, gone
    assert all(snapshots(app / name) == [("1", "s1")] for name in IMAGES)


def test_the_kept_state_records_vm_clock_0_its_identity_unchanged(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The safety snapshot, made through qemu-storage-daemon as the group's own are,
    records VM clock 0 as ``qemu-img snapshot -c`` does (not the host's clock), and
    keeps the id, name and date the catalog records."""
    from blktx.journal import SqliteJournal

    status, result = cli(capsys, "revert", "--keep-current", "app@s1")
    assert status == 0, result
    safety = f"blktx-before-revert-{result['txid']}"
    (kept,) = [e for e in SqliteJournal(os.environ["BLKTX_JOURNAL"]).group_snapshots("app") if e["txid"] == result["txid"]]
    made = {m["params"]["image"]: m["identity"]["made"] for m in kept["members"]}
    for name in IMAGES:
        out = run("qemu-img", "info", "-U", "--output=json", str(app / name))
        snaps = {s["name"]: s for s in json.loads(out)["snapshots"]}
        for snap in (snaps["s1"], snaps[safety]):
            assert (snap["vm-clock-sec"], snap["vm-clock-nsec"]) == (0, 0), snap
        ours = snaps[safety]
        assert made[str(app / name)] == [[ours["id"], ours["date-sec"], ours["date-nsec"]]]
        assert clean(app / name)


# -- (c) a member that fails rolls every image back ----------------------------------------


@pytest.mark.parametrize("how", ["apply fails", "snapshot deleted after the check"])
def test_a_failing_member_rolls_every_image_back(
    app: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    before = state(app)
    last = str(app / "d2.qcow2")
    if how == "apply fails":
        real = _qcow2_revert._snapshot_cmd
        calls: list[tuple[str, ...]] = []

        def failing(image: str, ident: Any, *args: str) -> None:
            calls.append((image, *args))
            if image == last and args[0] == "-a" and sum(c[0] == last and c[1] == "-a" for c in calls) == 1:
                raise _qcow2_revert.ActionFailed("injected: qemu-img snapshot -a failed")
            real(image, ident, *args)

        monkeypatch.setattr(_qcow2_revert, "_snapshot_cmd", failing)
    else:
        check = _qcow2_revert.InternalRevert.check

        def then_delete(self: Any, action: Any, ctx: Any) -> None:
            check(self, action, ctx)
            if action.params["image"] == last:  # somebody removes it between check and do
                run("qemu-img", "snapshot", "-d", "s1", last)

        monkeypatch.setattr(_qcow2_revert.InternalRevert, "check", then_delete)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 1 and result["outcome"] == "rolled back", result
    assert result["failure"]["action"] == 2 and result["failure"]["phase"] == "do"
    assert not result["leftovers"]
    for name in IMAGES:
        assert holds(app / name, NEW), f"{name} was not rolled back"
        assert clean(app / name)
        assert not safety_snapshots(app / name)
    after = state(app)
    if how != "apply fails":
        before["d2.qcow2"] = ([], before["d2.qcow2"][1])
    assert after == before


def test_a_safety_name_taken_after_the_check_touches_no_image(
    app: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Somebody makes a snapshot of the safety name in one image between check and do:
    the batch stops before any image is touched, and that snapshot is left alone."""
    check = _qcow2_revert.InternalRevert.check

    def then_take_the_name(self: Any, action: Any, ctx: Any) -> None:
        check(self, action, ctx)
        if action.params["image"] == str(app / "d1.qcow2"):
            run("qemu-img", "snapshot", "-c", action.undo["safety"], str(app / "d1.qcow2"))

    monkeypatch.setattr(_qcow2_revert.InternalRevert, "check", then_take_the_name)
    before = state(app)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 1 and result["outcome"] == "rolled back", result
    assert "appeared after the check; it was left alone" in result["failure"]["message"], result["failure"]
    after = state(app)
    taken = after["d1.qcow2"][0]
    assert [n for _, n in taken] == ["s1", f"blktx-before-revert-{result['txid']}"], "somebody else's snapshot stays"
    assert {k: v for k, v in after.items() if k != "d1.qcow2"} == {k: v for k, v in before.items() if k != "d1.qcow2"}
    assert after["d1.qcow2"][1] == before["d1.qcow2"][1] and all(holds(app / n, NEW) for n in IMAGES)


def test_the_group_is_snapshotted_and_cleaned_up_in_one_daemon_batch_each(
    app: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety snapshots of all images: one batch of storage daemons; their deletion
    after the commit point: one more (not one daemon per image)."""
    started: list[list[list[str]]] = []
    real = _qcow2_revert.Daemons
    deleted: list[dict[int, Any]] = []
    real_delete = _qcow2_revert._delete_snapshots

    def daemons(groups: list[list[str]], *args: Any) -> Any:
        started.append(groups)
        return real(groups, *args)

    def delete(plan: dict[int, Any], *args: Any) -> None:
        deleted.append(plan)
        real_delete(plan, *args)

    monkeypatch.setattr(_qcow2_revert, "Daemons", daemons)
    monkeypatch.setattr(_qcow2_revert, "_delete_snapshots", delete)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 0, result
    assert [sorted(os.path.basename(i) for g in groups for i in g) for groups in started] == [IMAGES]
    assert len(deleted) == 1 and sorted(len(v) for v in deleted[0].values()) == [1, 1, 1], deleted
    for i, name in enumerate(IMAGES):
        assert holds(app / name, i + 1) and snapshots(app / name) == [("1", "s1")] and clean(app / name)


def test_qemu_img_runs_only_while_blktx_is_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard around each qemu-img: the death signal armed, then the command run only
    if its parent is still blktx (here: a pid that is not the parent's, as after blktx
    died before the signal was armed: not run)."""
    if _qcow2_revert._trampoline() is None:
        pytest.skip("setpriv with --pdeathsig is not installed: the preexec_fn is used")
    ran = tmp_path / "ran"
    argv, preexec = _qcow2_revert._dying_with_blktx(["touch", str(ran)])
    assert preexec is None and subprocess.run(argv, check=False).returncode == 0 and ran.exists()
    ran.unlink()
    monkeypatch.setattr(os, "getpid", lambda: 1)  # not this test's pid: the parent seems gone
    argv, _ = _qcow2_revert._dying_with_blktx(["touch", str(ran)])
    assert subprocess.run(argv, check=False).returncode != 0 and not ran.exists()


# -- (d) refusals touch nothing --------------------------------------------------------------


def _refused(app: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    before = state(app)
    status, result = cli(capsys, *args)
    assert status == 2 and result["outcome"] == "invalid", result
    assert state(app) == before, "a refused revert touched an image"
    return result


def test_a_member_deleted_by_hand_refuses_the_revert(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run("qemu-img", "snapshot", "-d", "s1", str(app / "d1.qcow2"))
    result = _refused(app, capsys, "revert", "app@s1")
    (problem,) = result["problems"]
    assert "is gone" in problem["message"] and problem["target"] == str(app / "d1.qcow2"), problem


def test_a_snapshot_remade_under_the_same_name_is_not_reverted_to(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deleted and made again by hand: QEMU gives it the same id, another date. The
    catalog's plan refuses it, and so does the type's own check given the old date."""
    image = app / "d1.qcow2"
    entry = cli(capsys, "list", "app")[1]["group_snapshots"][0]
    ((sid, sec, nsec),) = entry["members"][1]["identity"]["made"]
    run("qemu-img", "snapshot", "-d", "s1", str(image))
    time.sleep(0.01)
    run("qemu-img", "snapshot", "-c", "s1", str(image))
    assert snapshots(image) == [(sid, "s1")]
    result = _refused(app, capsys, "revert", "app@s1")
    assert "is gone" in result["problems"][0]["message"]
    spec = app / "revert.toml"
    spec.write_text(
        f'version = 1\n[[action]]\ntype = "qcow2.internal-revert"\nimage = "d1.qcow2"\nname = "s1"\nid = "{sid}"\n'
        f'date = "{sec}.{nsec:09d}"\n'
    )
    result = _refused(app, capsys, "run", str(spec))
    (problem,) = result["problems"]
    assert f"image {image}: snapshot id {sid} is now snapshot 's1'" in problem["message"], problem
    assert "nothing was reverted" in problem["message"]


def test_an_image_held_by_a_running_process_refuses_the_revert(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = app / "d1.qcow2"
    daemon = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={image}",
            "--blockdev",
            "driver=qcow2,node-name=n0,file=f0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while holder(str(image)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        result = _refused(app, capsys, "revert", "app@s1")
        (problem,) = result["problems"]
        assert problem["action"] == 1, problem
        assert f"image {image} is in use by qemu-storage-daemon (pid {daemon.pid}): stop the VM first" in problem["message"]
    finally:
        daemon.kill()
        daemon.wait()
    assert not any(safety_snapshots(app / name) for name in IMAGES)


# -- (e) delete, by identity ------------------------------------------------------------------


def test_delete_removes_exactly_the_group_snapshots_and_its_catalog_entry(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    time.sleep(0.01)
    run("qemu-img", "snapshot", "-c", "s1", str(app / "d0.qcow2"))  # made by hand later: same name, id 2
    status, result = cli(capsys, "delete", "app@s1")
    assert status == 0 and result["outcome"] == "committed", result
    assert snapshots(app / "d0.qcow2") == [("2", "s1")], "the snapshot made by hand is never deleted"
    assert snapshots(app / "d1.qcow2") == snapshots(app / "d2.qcow2") == []
    assert all(clean(app / name) and holds(app / name, NEW) for name in IMAGES)
    assert cli(capsys, "list")[1]["group_snapshots"] == []
    status, result = cli(capsys, "delete", "app@s1")
    assert status == 2 and "no group snapshot app@s1" in result["problems"][0]["message"]


def test_delete_of_a_remade_member_is_refused_and_missing_ok_leaves_it(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = app / "d1.qcow2"
    run("qemu-img", "snapshot", "-d", "s1", str(image))
    time.sleep(0.01)
    run("qemu-img", "snapshot", "-c", "s1", str(image))  # same id 1, another date
    remade = snapshots(image)
    result = _refused(app, capsys, "delete", "app@s1")
    assert "is gone" in result["problems"][0]["message"]
    status, result = cli(capsys, "delete", "--missing-ok", "app@s1")
    assert status == 0, result
    assert snapshots(image) == remade == [("1", "s1")]
    assert snapshots(app / "d0.qcow2") == snapshots(app / "d2.qcow2") == []
    assert cli(capsys, "list")[1]["group_snapshots"] == []


def test_internal_delete_with_a_date_refuses_another_point_in_time(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = app / "delete.toml"
    spec.write_text(
        'version = 1\n[[action]]\ntype = "qcow2.internal-delete"\nimage = "d0.qcow2"\nid = "1"\ndate = "12.000000005"\n'
    )
    result = _refused(app, capsys, "run", str(spec))
    assert "was made at" in result["problems"][0]["message"] and "not 12.000000005" in result["problems"][0]["message"]
    spec.write_text('version = 1\n[[action]]\ntype = "qcow2.internal-delete"\nimage = "d0.qcow2"\nid = "1"\ndate = "12.5"\n')
    assert "is not a snapshot date" in _refused(app, capsys, "run", str(spec))["problems"][0]["message"]


def test_date_text_and_parse_date_round_trip() -> None:
    assert _qcow2_revert.date_text((1700000000, 12345000)) == "1700000000.012345000"
    assert _qcow2_revert.parse_date("1700000000.012345000") == (1700000000, 12345000)
    assert _qcow2_revert.parse_date("12.000000005") == (12, 5)
    for bad in ("", "12", "12.5", "1.", ".000000005", "1.1234567890", "-1.000000000", "1e9", "1.000000000\n"):
        with pytest.raises(ValueError):
            _qcow2_revert.parse_date(bad)


def _checked_revert(folder: Path) -> tuple[Any, Any, Any]:
    """A checked qcow2.internal-revert of d0.qcow2 to s1, as a run has it before its do."""
    from blktx import ActionSpec, Transaction
    from blktx.context import RunContext
    from blktx.executor import Executor
    from blktx.plugins import default_registry
    from blktx.spec import bind

    registry = default_registry()
    spec = ActionSpec("qcow2.internal-revert", {"image": "d0.qcow2", "name": "s1"})
    actions, options = bind(Transaction([spec], base_dir=str(folder)), registry)
    ctx = RunContext("20260101T000000-0dead000", options, str(folder), registry.pm.hook)
    executor = Executor(registry)
    assert executor.check_actions(actions, ctx, None) == []
    return executor, actions, ctx


@pytest.mark.parametrize("others", [0, 1])
def test_a_safety_snapshot_blktx_died_before_journaling_is_removed_only_when_provable(app: Path, others: int) -> None:
    """blktx died after making the safety snapshot, before journaling its id and date
    (the data untouched). Its name carries the txid and its id is new: cancel deletes
    it. Two of that name cannot be told apart: both left, named, and the cancel fails."""
    executor, (action,), ctx = _checked_revert(app)
    image = app / "d0.qcow2"
    safety = action.undo["safety"]
    action.undo["present"] = [i for i, _ in snapshots(image)]  # the journal's last word: do began
    for _ in range(1 + others):
        run("qemu-img", "snapshot", "-c", safety, str(image))
    before = digest(image)
    failures = executor.step("cancel", [action], ctx)
    assert digest(image) == before and holds(image, NEW), "nothing was applied"
    if others:
        assert failures and "cannot be told apart" in failures[0].message, failures
        assert [n for _, n in snapshots(image)] == ["s1", safety, safety]
        assert all("maybe blktx's safety snapshot" in lo.what for lo in action.type.leftovers(action))
    else:
        assert failures == [] and snapshots(image) == [("1", "s1")]
    ctx.close()


def test_cancel_never_applies_nor_deletes_a_remade_safety_snapshot(app: Path) -> None:
    """Journaled: the safety snapshot's id and date. Deleted by hand and made again
    under its name (same id, another date): cancel neither applies nor deletes it, and
    says the state before the revert is gone."""
    executor, (action,), ctx = _checked_revert(app)
    assert executor.step("do", [action], ctx) == []
    image = app / "d0.qcow2"
    assert holds(image, 1)
    safety = action.undo["safety"]
    run("qemu-img", "snapshot", "-d", safety, str(image))
    time.sleep(0.01)
    run("qemu-img", "snapshot", "-c", safety, str(image))
    failures = executor.step("cancel", [action], ctx)
    assert failures and "is gone" in failures[0].message, failures
    assert [n for _, n in snapshots(image)] == ["s1", safety] and holds(image, 1)
    ctx.close()


# -- (f) killed at every journal write, then recovered -----------------------------------------


def _blktx(*args: str, crash_after: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BLKTX_CRASH_AFTER"}
    if crash_after is not None:
        env["BLKTX_CRASH_AFTER"] = str(crash_after)
    return subprocess.run([sys.executable, "-m", "blktx", *args], capture_output=True, text=True, env=env, check=False)


def untimed(found: dict[str, Any]) -> dict[str, Any]:
    """A state with the txid in a kept safety snapshot's name written <txid>: two runs compare equal."""
    return {
        k: ([(i, re.sub(r"-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$", "-<txid>", n)) for i, n in snaps], data)
        for k, (snaps, data) in found.items()
    }


@pytest.fixture
def fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    count = iter(range(1000))

    def make() -> tuple[Path, str]:
        folder = tmp_path / f"w{next(count)}"
        folder.mkdir()
        journal = str(folder.parent / f"{folder.name}.journal.sqlite")
        make_group(folder, capsys, "--journal", journal)
        return folder, journal

    yield make


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_a_revert_killed_at_every_journal_write_is_recovered_to_before_or_after(fresh: Any, keep: bool) -> None:
    extra = ["--keep-current"] if keep else []
    ref, journal = fresh()
    before = state(ref)
    done = _blktx("revert", "app@s1", *extra, "--journal", journal)
    assert done.returncode == 0, done.stdout + done.stderr
    after = untimed(state(ref))
    assert after != before
    killed = 0
    for n in range(1, 60):
        folder, journal = fresh()
        assert state(folder) == before
        out = _blktx("revert", "app@s1", *extra, "--journal", journal, crash_after=n)
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        killed += 1
        rec = _blktx("recover", "--journal", journal)
        assert rec.returncode == 0, f"kill after write {n}: " + rec.stdout + rec.stderr
        got = untimed(state(folder))
        assert got in (before, after), f"kill after write {n}: {got}"
        assert all(clean(folder / name) for name in IMAGES), f"kill after write {n}"
    assert killed >= 5, "the revert was killed at too few journal writes to mean anything"


# -- the contract, through blktx.testing's conformance suite -------------------------------------


class TestQcow2InternalRevert(ActionTypeConformance):
    type_name = "qcow2.internal-revert"

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "d.qcow2", size="4M", pattern=0x41, snapshots=("old",))
        write(base / "d.qcow2", 0x42)
        return {"image": "d.qcow2", "name": "old"}

    def observe(self, base: Path) -> Any:
        return world(base), digest(base / "d.qcow2")

    def make_foreign(self, base: Path, action: Any) -> bool:
        run("qemu-img", "snapshot", "-c", action.undo["safety"], str(base / "d.qcow2"))
        return True


class TestQcow2InternalCreateRevertAndDelete(ActionTypeConformance):
    """The kit's revert and delete properties of qcow2.internal-create, with data that
    changes after the create (the create's own properties: tests/test_conformance.py)."""

    type_name = "qcow2.internal-create"

    @classmethod
    def not_applicable(cls, test: str) -> str | None:
        if test not in cls.REVERT_PROPERTIES | {"test_delete_removes_what_create_made"}:
            return "the create's own properties are checked in tests/test_conformance.py"
        return super().not_applicable(test)

    def setup_world(self, base: Path) -> dict[str, Any]:
        make_image(base / "d.qcow2", size="4M", pattern=0x41, snapshots=("old",))
        return {"image": "d.qcow2", "name": "new"}

    def change(self, base: Path) -> None:
        write(base / "d.qcow2", 0x42)

    def observe(self, base: Path) -> Any:
        return world(base), digest(base / "d.qcow2")

    def observe_data(self, base: Path) -> Any:
        return digest(base / "d.qcow2")
