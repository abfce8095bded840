from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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


# -- group snapshots: blktx revert / delete of btrfs members (issue 13) ------------------------

GROUP_SPEC = """version = 1
group = "app"
snapshot = "{name}"
[[action]]
type = "btrfs.snapshot"
source = "{mnt}/data"
dest = "{mnt}/data.{name}"
[[action]]
type = "btrfs.snapshot"
source = "{mnt}/logs"
dest = "{mnt}/logs.{name}"
"""

ORIGINAL = {"data": {"file": "precious"}, "logs": {"log": "day 1\n"}}
CHANGED = {"data": {"file": "ruined", "new": "junk"}, "logs": {"log": "day 1\nday 2\n"}}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    from blktx.cli import main

    status = main([*args, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out) if out.strip() else {}


def info(path: Path) -> dict[str, str]:
    from blktx_plugins.btrfs import subvolume_info

    found = subvolume_info(str(path))
    assert found is not None, f"{path} is not a subvolume"
    return found


def files(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir()) if p.is_file()}


def put(path: Path, content: dict[str, str]) -> None:
    for p in path.iterdir():
        p.unlink()
    for name, text in content.items():
        (path / name).write_text(text)


def state(mnt: Path) -> dict[str, Any]:
    """Every entry of the mount (private names too): each subvolume's UUID and files,
    and every subvolume UUID of the filesystem."""
    out: dict[str, Any] = {}
    for p in sorted(mnt.iterdir()):
        if p.is_dir() and not p.is_symlink() and p.stat().st_ino == 256:
            out[p.name] = (info(p)["UUID"], files(p))
        else:
            out[p.name] = "not a subvolume"
    listing = subprocess.run(["btrfs", "subvolume", "list", "-u", str(mnt)], capture_output=True, text=True, check=True).stdout
    out["*uuids"] = sorted(line.split(" uuid ")[1].split()[0] for line in listing.splitlines() if " uuid " in line)
    return out


def group_snapshot(mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str = "s1") -> dict[str, Any]:
    """Subvolumes data and logs holding ORIGINAL, their group snapshot app@<name>, then
    CHANGED written to them; the world as it is then."""
    if not (mnt / "logs").exists():
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "logs")], check=True, capture_output=True)
    for sub in ("data", "logs"):
        put(mnt / sub, ORIGINAL[sub])
    spec = tmp_path / f"app-{name}.toml"
    spec.write_text(GROUP_SPEC.format(mnt=mnt, name=name))
    status, result = cli(capsys, "run", str(spec), "--root", str(mnt))
    assert status == 0, result
    for sub in ("data", "logs"):
        put(mnt / sub, CHANGED[sub])
    return state(mnt)


def reverted(mnt: Path, before: dict[str, Any], now: dict[str, Any], name: str = "s1") -> bool:
    """Whether ``now`` is exactly the world after reverting ``before`` to app@<name>:
    the snapshots untouched, each live subvolume a new writable copy of its snapshot
    holding ORIGINAL, the subvolumes replaced gone, no private name left."""
    snaps = {f"{sub}.{name}" for sub in ("data", "logs")}
    if set(now) != set(before) or any(now[s] != before[s] for s in snaps):
        return False
    for sub in ("data", "logs"):
        uuid, content = now[sub]
        if content != ORIGINAL[sub] or uuid in before["*uuids"]:
            return False
        if info(mnt / sub)["Parent UUID"] != before[f"{sub}.{name}"][0]:
            return False
    replaced = {before[sub][0] for sub in ("data", "logs")}
    return set(now["*uuids"]) == (set(before["*uuids"]) - replaced) | {now[sub][0] for sub in ("data", "logs")}


@pytest.fixture
def mnt(btrfs_mount: Path) -> Path:
    return btrfs_mount


def test_revert_brings_every_member_back_and_removes_what_was_set_aside(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 0 and result["outcome"] == "committed", result
    now = state(mnt)
    assert reverted(mnt, before, now), now
    assert not any(a.get("output") for a in result["actions"])
    (mnt / "data" / "writable").write_text("yes")  # a writable copy, not the read-only snapshot
    # again, from a live subvolume that an earlier revert made
    put(mnt / "data", {"file": "ruined again"})
    again = state(mnt)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 0, result
    assert reverted(mnt, again, state(mnt))


def test_keep_current_keeps_what_each_member_held_and_says_where(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    status, result = cli(capsys, "revert", "--keep-current", "app@s1")
    assert status == 0, result
    now = state(mnt)
    txid = result["txid"]
    for sub in ("data", "logs"):
        assert now[sub][1] == ORIGINAL[sub]
        assert now[f".{sub}.blktx-before-{txid}"] == before[sub], "the old subvolume, by UUID and content"
    outputs = [a["output"] for a in result["actions"]]
    assert any(f".data.blktx-before-{txid}" in o and before["data"][0] in o for o in outputs), outputs
    assert sorted(now) == sorted([*before, f".data.blktx-before-{txid}", f".logs.blktx-before-{txid}"])
    # the kept state is a group snapshot of its own: listed, complete, to go back to or delete
    status, listing = cli(capsys, "list", "app", "--verify")
    kept = [e for e in listing["group_snapshots"] if e["name"].startswith("before-revert-")]
    assert len(kept) == 1 and kept[0]["state"] == "complete" and kept[0]["txid"] == txid, listing
    status, result = cli(capsys, "revert", f"app@{kept[0]['name']}")
    assert status == 0, result
    assert all(state(mnt)[sub][1] == before[sub][1] for sub in ("data", "logs")), "back to what it held"
    status, result = cli(capsys, "delete", f"app@{kept[0]['name']}")
    assert status == 0, result
    assert not [n for n in state(mnt) if n.startswith(f".data.blktx-before-{txid}")], "deleted by its UUID"


def holding(path: Path) -> subprocess.Popen[str]:
    """A process with a file under ``path`` open, started and ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print('ready', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_revert_refused_by_one_member_touches_nothing(mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    proc = holding(mnt / "logs" / "log")
    try:
        status, result = cli(capsys, "revert", "app@s1")
    finally:
        proc.kill()
        proc.wait()
    assert status == 2, result
    (problem,) = result["problems"]
    assert (
        f"{mnt}/logs is in use by python" in problem["message"]
        and f"pid {proc.pid}: open file {mnt}/logs/log" in problem["message"]
    )
    assert "stop what uses it first" in problem["hint"]
    assert state(mnt) == before
    # a working directory, a nested subvolume, a mount: each refused, naming it
    sleeper = subprocess.Popen(["sleep", "120"], cwd=mnt / "data")
    try:
        status, result = cli(capsys, "revert", "app@s1")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert status == 2 and f"sleep (pid {sleeper.pid}: working directory {mnt}/data)" in result["problems"][0]["message"]
    subprocess.run(["btrfs", "subvolume", "create", str(mnt / "data" / "inner")], check=True, capture_output=True)
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 2 and f"holds other subvolumes ({mnt}/data/inner)" in result["problems"][0]["message"]
    subprocess.run(["btrfs", "subvolume", "delete", str(mnt / "data" / "inner")], check=True, capture_output=True)
    (tmp_path / "elsewhere").mkdir()
    subprocess.run(["mount", "--bind", str(mnt / "logs"), str(tmp_path / "elsewhere")], check=True)
    try:
        status, result = cli(capsys, "revert", "app@s1")
    finally:
        subprocess.run(["umount", str(tmp_path / "elsewhere")], check=True)
    assert status == 2 and f"also mounted at {tmp_path / 'elsewhere'}" in result["problems"][0]["message"]
    assert state(mnt) == before


def test_nested_subvolumes_stay_in_the_subvolume_kept_aside(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group_snapshot(mnt, tmp_path, capsys)
    subprocess.run(["btrfs", "subvolume", "create", str(mnt / "data" / "inner")], check=True, capture_output=True)
    status, result = cli(capsys, "revert", "--keep-current", "app@s1")
    assert status == 0, result
    aside = mnt / f".data.blktx-before-{result['txid']}"
    assert (aside / "inner").stat().st_ino == 256 and not (mnt / "data" / "inner").exists()
    assert any(f"nested subvolumes {mnt}/data/inner" in (a.get("output") or "") for a in result["actions"])


def revert_actions(mnt: Path, before: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("btrfs.revert", {"path": str(mnt / sub), "snapshot": str(mnt / f"{sub}.s1"), "uuid": before[f"{sub}.s1"][0]})
        for sub in ("data", "logs")
    ]


def test_a_revert_acts_only_on_the_snapshot_it_names(mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    data_snap, logs_snap = before["data.s1"][0], before["logs.s1"][0]
    result = run(
        mnt,
        [
            ("btrfs.revert", {"path": "data", "snapshot": "data.s1", "uuid": logs_snap}),
            ("btrfs.revert", {"path": "logs", "snapshot": "logs.s1", "source_uuid": before["data"][0]}),
        ],
    )
    assert result.outcome == "invalid"
    first, second = (p.message for p in result.problems)
    assert first.endswith(
        f"{mnt}/data.s1 is subvolume {data_snap}, not the snapshot {logs_snap}: "
        "a subvolume made again under that name is never used"
    )
    assert f"{mnt}/logs.s1 is not a snapshot of subvolume {before['data'][0]}" in second
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", "-r", str(mnt / "data"), str(mnt / "data" / "inside")], check=True, capture_output=True
    )
    result = run(mnt, [("btrfs.revert", {"path": "data", "snapshot": "data/inside", "keep_current": True})])
    assert result.outcome == "invalid" and "lies inside" in result.problems[0].message
    subprocess.run(["btrfs", "subvolume", "delete", str(mnt / "data" / "inside")], check=True, capture_output=True)
    assert state(mnt) == before


def test_a_revert_that_fails_after_both_switched_puts_both_back(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    result = run(mnt, [*revert_actions(mnt, before), ("fault", {"phase": "invalidate"})])
    assert result.outcome == "rolled back", result.summary()
    assert state(mnt) == before


def test_an_aside_name_that_appears_after_the_check_is_left_alone(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blktx.context import RunContext
    from blktx.executor import Executor as Ex
    from blktx.spec import bind

    before = group_snapshot(mnt, tmp_path, capsys)
    registry = default_registry()
    actions, options = bind(Transaction([ActionSpec(t, p) for t, p in revert_actions(mnt, before)], base_dir=str(mnt)), registry)
    ctx = RunContext("late", options, str(mnt), registry.pm.hook)
    executor = Ex(registry)
    assert executor.check_actions(actions, ctx, None) == []
    (mnt / ".logs.blktx-before-late").mkdir()
    assert executor.step("do", actions, ctx) == []
    failures = executor.step("invalidate", actions, ctx)
    assert [f.action for f in failures] == [1] and "appeared after the check" in failures[0].message
    assert actions[0].state == "INVALIDATED" and files(mnt / "data") == ORIGINAL["data"]
    assert executor.step("cancel", actions[::-1], ctx) == []
    assert state(mnt) == {**before, ".logs.blktx-before-late": "not a subvolume"}
    assert executor.step("cancel", actions[::-1], ctx) == [], "cancel again: the same world"
    assert state(mnt) == {**before, ".logs.blktx-before-late": "not a subvolume"}


def reset(mnt: Path) -> None:
    """Every subvolume but data deleted."""
    for p in sorted(mnt.iterdir(), key=lambda p: -len(p.name)):
        if p.name != "data":
            subprocess.run(["btrfs", "subvolume", "delete", str(p)], check=True, capture_output=True)


def test_killed_at_every_journal_write_recover_gives_the_before_or_the_after_world(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = []
    for n in range(1, 40):
        reset(mnt)
        monkeypatch.setenv("BLKTX_JOURNAL", str(tmp_path / f"j{n}.sqlite"))
        before = group_snapshot(mnt, tmp_path, capsys)
        env = {**os.environ, "BLKTX_CRASH_AFTER": str(n)}
        killed = subprocess.run([sys.executable, "-m", "blktx", "revert", "app@s1"], env=env, capture_output=True, text=True)
        rec = subprocess.run([sys.executable, "-m", "blktx", "recover"], capture_output=True, text=True, check=False)
        assert rec.returncode == 0, rec.stdout + rec.stderr
        now = state(mnt)
        assert now == before or reverted(mnt, before, now), f"killed after journal write {n}: {now}\n{before}"
        outcomes.append(now != before)
        if killed.returncode != -9:
            assert killed.returncode == 0 and outcomes[-1], killed.stdout + killed.stderr
            break
    else:
        pytest.fail("every run was killed")
    print("OUTCOMES", outcomes)
    assert False in outcomes[:-1] and True in outcomes[:-1], f"kills fell before and after the commit point: {outcomes}"


def test_delete_removes_exactly_the_members_and_refuses_a_remake(
    mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = group_snapshot(mnt, tmp_path, capsys)
    status, result = cli(capsys, "delete", "app@s1")
    assert status == 0 and result["outcome"] == "committed", result
    assert state(mnt) == {
        "data": before["data"],
        "logs": before["logs"],
        "*uuids": sorted([before["data"][0], before["logs"][0]]),
    }
    # a member deleted by hand and made again under its name: never deleted in its place
    group_snapshot(mnt, tmp_path, capsys, "s2")
    old = info(mnt / "data.s2")["UUID"]
    subprocess.run(["btrfs", "subvolume", "delete", str(mnt / "data.s2")], check=True, capture_output=True)
    subprocess.run(["btrfs", "subvolume", "snapshot", str(mnt / "data"), str(mnt / "data.s2")], check=True, capture_output=True)
    remade = state(mnt)
    status, result = cli(capsys, "delete", "app@s2")
    assert status == 2 and "member #0 (btrfs.snapshot): is gone" in result["problems"][0]["message"]
    result2 = run(mnt, [("btrfs.delete", {"path": "data.s2", "uuid": old})])
    assert result2.outcome == "invalid"
    assert result2.problems[0].message.endswith(
        f"{mnt}/data.s2 is subvolume {remade['data.s2'][0]}, not {old}: a subvolume made again under that name is never deleted"
    )
    assert state(mnt) == remade
    status, result = cli(capsys, "delete", "--missing-ok", "app@s2")
    assert status == 0, result
    assert "logs.s2" not in state(mnt) and state(mnt)["data.s2"] == remade["data.s2"], "the remake stays"


def test_a_delete_acts_on_the_uuid_never_on_what_the_name_leads_to(btrfs_mount: Path) -> None:
    """A symlink swapped in at the name (to a subvolume that is not ours), or our
    subvolume moved away: nothing is deleted that is not the checked UUID, and a
    move is not reported as done."""
    from blktx_plugins.btrfs import delete_subvolume

    run_cmd = subprocess.run
    run_cmd(["btrfs", "subvolume", "create", str(btrfs_mount / "precious")], check=True, capture_output=True)
    result = run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "snap"})])
    assert result.outcome == "committed"
    ours = result.actions[0].undo["uuid"]
    theirs = info(btrfs_mount / "precious")["UUID"]
    (btrfs_mount / "snap").rename(btrfs_mount / "moved")
    os.symlink("precious", btrfs_mount / "snap")
    assert delete_subvolume(str(btrfs_mount / "snap"), theirs) is False, "a symlink at the name is never followed"
    assert delete_subvolume(str(btrfs_mount / "snap"), ours) is False
    assert (btrfs_mount / "precious").is_dir() and (btrfs_mount / "moved").is_dir()
    done = run(btrfs_mount, [("btrfs.delete", {"path": "moved", "uuid": ours})])
    assert done.outcome == "committed" and not (btrfs_mount / "moved").exists(), "by its UUID, wherever it is named"
    # checked at its name, then moved before the finalize step: refused, not "already deleted"
    again = run(btrfs_mount, [("btrfs.snapshot", {"source": "data", "dest": "snap2"})])
    uuid2 = again.actions[0].undo["uuid"]
    from blktx_plugins import btrfs as plugin

    real_do = plugin.Delete.do

    def move_first(self: Any, action: Any, ctx: Any) -> None:
        if (btrfs_mount / "snap2").exists():  # once: the finalize step is retried
            (btrfs_mount / "snap2").rename(btrfs_mount / "elsewhere")
        real_do(self, action, ctx)

    plugin.Delete.do = move_first  # type: ignore[method-assign]
    try:
        moved = run(btrfs_mount, [("btrfs.delete", {"path": "snap2", "uuid": uuid2})])
    finally:
        plugin.Delete.do = real_do  # type: ignore[method-assign]
    assert moved.outcome == "needs recovery" and "was moved to elsewhere" in str(moved.pending), moved.summary()
    assert (btrfs_mount / "elsewhere").is_dir() and (btrfs_mount / "precious").is_dir()


def test_a_revert_through_a_symlinked_folder_is_refused(mnt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    group_snapshot(mnt, tmp_path, capsys)
    os.rename(mnt / "data", mnt / "data.real")
    os.symlink("data.real", mnt / "data")
    status, result = cli(capsys, "revert", "app@s1")
    assert status == 2 and "goes through a symlink" in json.dumps(result["problems"]), result
