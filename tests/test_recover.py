"""Crash safety: kill the run at every journal write in turn, then `blktx recover`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import make_image, needs_qemu_img, world

from blktx import Hold, Refused, hookimpl
from blktx_plugins.sim import make_world, read_world

SIM_SPEC = """\
version = 1
[[action]]
type = "sim.snapshot"
device = "a"
name = "nightly"
[[action]]
type = "sim.overlay"
device = "b"
layer = "b.nightly"
[[action]]
type = "sim.snapshot"
device = "c"
name = "nightly"
[[action]]
type = "sim.delete"
device = "a"
name = "old"
"""

QCOW2_SPEC = """\
version = 1
[[action]]
type = "qcow2.internal-create"
image = "d0.qcow2"
name = "nightly"
replace = true
[[action]]
type = "qcow2.internal-create"
image = "d1.qcow2"
name = "nightly"
[[action]]
type = "qcow2.external-create"
device = "vm"
overlay = "vm.nightly.qcow2"
[[action]]
type = "qcow2.internal-delete"
image = "d1.qcow2"
name = "weekly"
"""


def blktx(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktx.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def recover(journal: Path) -> list[dict[str, Any]]:
    out = blktx("recover", "--json", "--journal", str(journal))
    assert out.returncode == 0, f"recover exited {out.returncode}: {out.stdout} {out.stderr}"
    return json.loads(out.stdout)["transactions"]  # type: ignore[no-any-return]


def locks(journal: Path) -> list[Any]:
    """Every claim left in the lock folder (any journal's): none once all is recovered."""
    from blktx.locks import Locker

    return Locker().claims()


def crash_points(tmp_path: Path, setup: Any, spec_text: str, observe: Any) -> tuple[int, int]:
    """Kill the run after journal write 1, 2, ... until a run finishes; recover after each."""
    ref = tmp_path / "ref"
    setup(ref)
    (ref / "t.toml").write_text(spec_text)
    before = observe(ref)
    out = blktx("run", str(ref / "t.toml"), "--journal", str(tmp_path / "ref.sqlite"))
    assert out.returncode == 0, out.stdout + out.stderr
    after = observe(ref)
    assert after != before
    tried = survived = 0
    for n in range(1, 100):
        work = tmp_path / f"crash{n}"
        setup(work)
        (work / "t.toml").write_text(spec_text)
        journal = tmp_path / f"crash{n}.sqlite"
        out = blktx("run", str(work / "t.toml"), "--journal", str(journal), env={"BLKTX_CRASH_AFTER": str(n)})
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stderr
        tried += 1
        first = recover(journal)
        state = observe(work)
        assert state in (before, after), f"crash after write {n}: {first}"
        if state == after:
            assert all(t["outcome"] == "committed" for t in first)
        assert recover(journal) == [], "a second recover changes nothing"
        assert observe(work) == state
        assert locks(journal) == []
        survived += 1
    return tried, survived


def test_sim_every_crash_point(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        d.mkdir()
        make_world(
            str(d / "sim-world.json"),
            {
                "a": {"snapshots": {"1": "old"}, "layers": ["a0"], "active": "a0"},
                "b": {"snapshots": {}, "layers": ["b0"], "active": "b0"},
                "c": {"snapshots": {}, "layers": ["c0"], "active": "c0"},
            },
        )

    tried, survived = crash_points(tmp_path, setup, SIM_SPEC, lambda d: read_world(str(d / "sim-world.json")))
    assert tried == survived >= 7  # begin, do intent, do+invalidate intent, commit, finalize intent+done, end


def _qcow2_setup(d: Path) -> None:
    d.mkdir()
    make_image(d / "d0.qcow2", pattern=0x11, snapshots=("nightly",))
    make_image(d / "d1.qcow2", pattern=0x22, snapshots=("weekly",))
    make_image(d / "vm.base.qcow2", pattern=0x33)
    os.symlink("vm.base.qcow2", d / "vm")


@needs_qemu_img
def test_qcow2_every_crash_point(tmp_path: Path) -> None:
    tried, survived = crash_points(tmp_path, _qcow2_setup, QCOW2_SPEC, world)
    assert tried == survived >= 7  # every durable write of the run


@needs_qemu_img
def test_qcow2_random_sigkill_from_outside(tmp_path: Path) -> None:
    images = 24

    def setup(d: Path) -> str:
        d.mkdir()
        lines = ["version = 1"]
        for i in range(images):
            make_image(d / f"d{i}.qcow2")
            lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "d{i}.qcow2"', 'name = "s"']
        for i in range(4):
            make_image(d / f"v{i}.base.qcow2")
            os.symlink(f"v{i}.base.qcow2", d / f"v{i}")
            lines += ["[[action]]", 'type = "qcow2.external-create"', f'device = "v{i}"', f'overlay = "v{i}.new.qcow2"']
        (d / "t.toml").write_text("\n".join(lines) + "\n")
        return str(d / "t.toml")

    rng = random.Random(20261126)
    outcomes = {"before": 0, "after": 0}
    for n in range(10):
        work = tmp_path / f"k{n}"
        spec = setup(work)
        before = world(work)
        journal = tmp_path / f"k{n}.sqlite"
        proc = subprocess.Popen(
            [sys.executable, "-m", "blktx.cli", "run", spec, "--journal", str(journal)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.05)  # the daemon's death signal is asynchronous
        recover(journal)  # exit 0: a kill inside do leaves nothing unprovable (the heartbeat bounds it)
        state = world(work)
        if state == before:
            outcomes["before"] += 1
        else:
            assert all(state[f"d{i}.qcow2"] == ("image", [("1", "s")]) for i in range(images)), state
            assert all(state[f"v{i}"][1] == f"v{i}.new.qcow2" for i in range(4))
            outcomes["after"] += 1
        assert recover(journal) == [] and locks(journal) == []
        shutil.rmtree(work)
    assert sum(outcomes.values()) == 10


def _undo(journal: Path) -> list[dict[str, Any]]:
    """Each action's undo facts as the journal holds them."""
    import sqlite3

    con = sqlite3.connect(journal)
    try:
        return [json.loads(r[0] or "{}") for r in con.execute("SELECT undo FROM action ORDER BY idx")]
    finally:
        con.close()


@needs_qemu_img
@pytest.mark.parametrize("jobs", [1, 3])
def test_qcow2_kill_inside_the_storage_daemons_transaction_is_rolled_back_by_recover(tmp_path: Path, jobs: int) -> None:
    """SIGKILL blktx the moment the daemon's transaction has written the first image's
    snapshot: the journal says do started but not what it made. The daemon holds every
    image's lock until it dies with blktx, and the heartbeat in its folder bounds that
    moment; so recover proves the new snapshots blktx's, removes them and exits 0.
    ``jobs = 3``: three daemons at once, each bounded by its own heartbeat."""
    from blktx_plugins._image import read_header

    images = 48
    for attempt in range(8):
        work = tmp_path / f"a{attempt}"
        work.mkdir()
        lines = ["version = 1"]
        for i in range(images):
            make_image(work / f"d{i}.qcow2")
            lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "d{i}.qcow2"', 'name = "s"']
        (work / "t.toml").write_text("\n".join(lines) + "\n")
        before = world(work)
        journal = tmp_path / f"a{attempt}.sqlite"
        proc = subprocess.Popen(
            [sys.executable, "-m", "blktx.cli", "run", str(work / "t.toml"), "--journal", str(journal), "--jobs", str(jobs)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = str(work / "d0.qcow2")

        def made(first: str = first) -> bool:
            try:
                return bool(read_header(first)[1])
            except Refused:  # read while QEMU was writing it: look again
                return False

        while proc.poll() is None and not made():
            pass  # spin: the window between QEMU's write and blktx's journal write is short
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        undo = _undo(journal)
        if not all("started" in u and "made" not in u for u in undo):
            shutil.rmtree(work)
            continue  # the kill landed outside the transaction; try again
        if jobs > 1:
            assert len({u["heartbeat"] for u in undo}) == jobs, "one daemon (and heartbeat) per batch"
        time.sleep(0.05)  # the daemon's death signal is asynchronous
        assert any(state[1] for name, state in world(work).items() if name.endswith(".qcow2")), (
            "the transaction had made snapshots when blktx died"
        )
        out = blktx("recover", "--json", "--journal", str(journal))
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["transactions"][0]["outcome"] == "rolled back"
        assert world(work) == before
        assert recover(journal) == [] and locks(journal) == []
        return
    pytest.fail("no kill landed inside the daemon's transaction in 8 tries")


@needs_qemu_img
def test_two_runs_on_overlapping_targets(tmp_path: Path) -> None:
    """One commits; the other is refused naming the target and holder, or waits and commits after it."""
    for i in range(3):
        make_image(tmp_path / f"d{i}.qcow2")
    slow = ["[[action]]", 'type = "exec"', 'target = "slow"', 'do = ["sleep", "2"]', 'cancel = ["true"]']

    def spec(name: str, images: list[int], extra: list[str]) -> str:
        lines = ["version = 1"]
        for i in images:
            lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "d{i}.qcow2"', f'name = "{name}"']
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines + extra) + "\n")
        return str(path)

    journal = str(tmp_path / "j.sqlite")
    env = {**os.environ, "BLKTX_JOURNAL": journal}
    cmd = [sys.executable, "-m", "blktx.cli", "run", "--json"]
    first = subprocess.Popen([*cmd, "--allow-exec", spec("a", [0, 1], slow)], stdout=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 30

    def first_holds_locks() -> bool:
        try:
            return bool(locks(Path(journal)))
        except Exception:  # noqa: BLE001 - the journal is still being created
            return False

    while time.monotonic() < deadline and not first_holds_locks():
        time.sleep(0.02)  # until the first run holds its targets
    refused = subprocess.run([*cmd, spec("b", [1, 2], [])], capture_output=True, env=env, text=True)
    waited = subprocess.run([*cmd, "--wait", "30", spec("c", [2, 1], [])], capture_output=True, env=env, text=True)
    out, _ = first.communicate()
    assert first.returncode == 0, out
    assert refused.returncode == 2, refused.stdout
    problem = json.loads(refused.stdout)["problems"][0]
    assert problem["target"] == str(tmp_path / "d1.qcow2")
    assert f"(pid {first.pid})" in problem["message"] and json.loads(out)["txid"] in problem["message"]
    assert waited.returncode == 0, waited.stdout
    from qemu_helpers import snapshots

    assert [n for _, n in snapshots(tmp_path / "d0.qcow2")] == ["a"]
    assert [n for _, n in snapshots(tmp_path / "d1.qcow2")] == ["a", "c"]
    assert [n for _, n in snapshots(tmp_path / "d2.qcow2")] == ["c"]


@needs_qemu_img
def test_live_vm_every_crash_point_is_resumed_and_all_or_none(tmp_path: Path) -> None:
    import shutil as _shutil

    if _shutil.which("qemu-system-x86_64") is None:
        import pytest

        pytest.skip("needs qemu-system-x86_64 (Debian qemu-system-x86)")
    from qemu_helpers import VM, snapshots

    tried = 0
    for n in range(1, 60):
        work = tmp_path / f"c{n}"
        work.mkdir()
        vm = VM(work, "vm")
        make_image(work / "off.qcow2")
        (work / "t.toml").write_text(
            'version = 1\n[options]\nquiesce = "pause"\n'
            '[[action]]\ntype = "qmp.internal-create"\nvm = "vm.qmp"\ndrive = "drive0"\nname = "s"\n'
            '[[action]]\ntype = "qmp.external-create"\nvm = "vm.qmp"\ndrive = "drive1"\noverlay = "ov.qcow2"\n'
            '[[action]]\ntype = "qcow2.internal-create"\nimage = "off.qcow2"\nname = "s"\n'
        )
        journal = work / "j.sqlite"
        try:
            # BLKTX_WATCHDOG=0: as after a power loss, recover alone must resume the VM
            out = blktx(
                "run", str(work / "t.toml"), "--journal", str(journal), env={"BLKTX_CRASH_AFTER": str(n), "BLKTX_WATCHDOG": "0"}
            )
            if out.returncode == 0:
                assert vm.running() and vm.snapshots(0) == ["s"] and vm.active_file(1) == "ov.qcow2"
                break
            assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
            tried += 1
            recover(journal)
            assert vm.running(), f"crash after write {n}: the VM is still paused"
            committed = vm.snapshots(0) == ["s"]
            assert vm.active_file(1) == ("ov.qcow2" if committed else "vm-d1.qcow2")
            assert (work / "ov.qcow2").exists() == committed
            assert [s for _, s in snapshots(work / "off.qcow2")] == (["s"] if committed else [])
            assert recover(journal) == [] and locks(journal) == []
        finally:
            vm.quit()
    assert tried >= 10


@needs_qemu_img
def test_frozen_and_paused_guest_every_crash_point_is_thawed_and_resumed(tmp_path: Path, btrfs_mount: Path) -> None:
    """quiesce = "fsfreeze+pause" killed at every journal write: recover continues
    the VM and thaws its filesystems (a real qemu-ga on this host, freezing a
    loop-mounted btrfs)."""
    import pytest

    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-ga") is None:
        pytest.skip("needs qemu-system-x86_64 (Debian qemu-system-x86) and qemu-ga (Debian qemu-guest-agent)")
    from qemu_helpers import VM, GuestAgent

    agent = GuestAgent(tmp_path, [btrfs_mount])
    tried = 0
    try:
        for n in range(1, 60):
            work = tmp_path / f"c{n}"
            work.mkdir()
            vm = VM(work, "vm")
            (work / "t.toml").write_text(
                'version = 1\n[options]\nquiesce = "fsfreeze+pause"\n'
                f'[[action]]\ntype = "qmp.internal-create"\nvm = "vm.qmp"\ndrive = "drive0"\nname = "s"\n'
                f'agent = "{agent.sock}"\nfreeze = ["{btrfs_mount}"]\n'
            )
            journal = work / "j.sqlite"
            try:
                out = blktx(
                    "run",
                    str(work / "t.toml"),
                    "--journal",
                    str(journal),
                    "--vm-root",
                    str(tmp_path),
                    env={"BLKTX_CRASH_AFTER": str(n), "BLKTX_WATCHDOG": "0"},
                )
                if out.returncode == 0:
                    assert vm.running() and vm.snapshots(0) == ["s"] and agent.status() == "thawed"
                    break
                assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
                tried += 1
                recover(journal)
                assert vm.running(), f"crash after write {n}: the VM is still paused"
                assert agent.status() == "thawed", f"crash after write {n}: the guest is still frozen"
                assert vm.snapshots(0) in ([], ["s"])
                assert recover(journal) == [] and locks(journal) == []
            finally:
                vm.quit()
    finally:
        agent.stop()
    assert tried >= 8


@needs_qemu_img
def test_qcow2_replace_alone_every_crash_point(tmp_path: Path) -> None:
    """No type here implements invalidate, so the journal never says INVALIDATED:
    recover must still roll the post-commit deletion of the old snapshot forward."""

    def setup(d: Path) -> None:
        d.mkdir()
        make_image(d / "d0.qcow2", snapshots=("nightly", "keep"))

    spec = 'version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "d0.qcow2"\nname = "nightly"\nreplace = true\n'
    tried, survived = crash_points(tmp_path, setup, spec, world)
    assert tried == survived >= 6


class FlakyResume:
    """Two holds (freeze, then pause); resuming fails while ``broken`` is set.
    Records the order of resumes."""

    def __init__(self) -> None:
        self.broken = True
        self.resumed: list[str] = []

    @hookimpl
    def blktx_quiesce(self, ctx: Any, actions: Any) -> None:
        ctx.holding([Hold("t.freeze", "guest"), Hold("t.pause", "vm")])

    @hookimpl
    def blktx_resume(self, ctx: Any, hold: Hold) -> bool | None:
        if not hold.kind.startswith("t."):
            return None
        if self.broken and hold.kind == "t.pause":
            raise RuntimeError("monitor not answering")
        self.resumed.append(hold.kind)
        return True


@pytest.mark.parametrize("fail", [False, True])
def test_a_failed_resume_is_left_for_recover_which_resumes_it(tmp_path: Path, fail: bool) -> None:
    from blktx import ActionSpec, Executor, Transaction
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker
    from blktx.plugins import load
    from blktx.recover import recover as recover_in_process

    plugin = FlakyResume()
    registry = load(extra=[("flaky", plugin)])
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    actions = [ActionSpec("sim.noop", {"key": "a"})] + ([ActionSpec("fault", {"phase": "do"})] if fail else [])
    result = Executor(registry, journal=journal, locker=Locker()).run(
        Transaction(actions, options={"quiesce": "pause"}, base_dir=str(tmp_path))
    )
    assert result.outcome == "needs recovery" and result.exit_status == 3
    assert result.committed is not fail
    assert any("still t.pause (resume failed: monitor not answering)" in str(lo) for lo in result.leftovers)
    assert plugin.resumed == ["t.freeze"]
    (row,) = journal.transactions()
    assert row["status"] == ("ROLLBACK_INCOMPLETE" if fail else "FINALIZE_INCOMPLETE")
    assert row["outcome"] == "needs recovery"
    holds = journal.transaction(result.txid)["holds"]
    assert [(h["n"], h["kind"], h["resumed"]) for h in holds] == [(0, "t.freeze", 1), (1, "t.pause", 0)]

    plugin.broken = False
    (done,) = recover_in_process(journal, registry, Locker())
    assert (done["outcome"], done["message"]) == (("rolled back", "rolled back") if fail else ("committed", "rolled forward")), (
        done
    )
    assert plugin.resumed == ["t.freeze", "t.pause"], "recover resumes only what is still held"
    holds = journal.transaction(result.txid)["holds"]
    assert [(h["n"], h["kind"], h["resumed"]) for h in holds] == [(0, "t.freeze", 1), (1, "t.pause", 1)]
    assert recover_in_process(journal, registry, Locker()) == []


def test_recover_resumes_newest_first(tmp_path: Path) -> None:
    """A paused guest cannot thaw: recover continues the VM before it thaws, as a run does."""
    from blktx import ActionSpec, Executor, Transaction
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker
    from blktx.plugins import load
    from blktx.recover import recover as recover_in_process

    plugin = FlakyResume()
    registry = load(extra=[("flaky", plugin)])
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))

    class Dead(FlakyResume):
        @hookimpl
        def blktx_resume(self, ctx: Any, hold: Hold) -> bool | None:
            if hold.kind.startswith("t."):
                raise RuntimeError("gone")
            return None

    dead_registry = load(extra=[("dead", Dead())])
    result = Executor(dead_registry, journal=journal, locker=Locker()).run(
        Transaction([ActionSpec("sim.noop", {"key": "a"})], options={"quiesce": "pause"}, base_dir=str(tmp_path))
    )
    assert result.outcome == "needs recovery" and len(result.leftovers) == 2
    plugin.broken = False
    recover_in_process(journal, registry, Locker())
    assert plugin.resumed == ["t.pause", "t.freeze"]


def rollback_crash_points(tmp_path: Path, setup: Any, spec_text: str, observe: Any) -> int:
    """Kill a run that rolls back after journal write 1, 2, ... (crashes inside its
    rollback included); after each, recover must leave the world as before."""
    tried = 0
    for n in range(1, 100):
        work = tmp_path / f"rb{n}"
        setup(work)
        (work / "t.toml").write_text(spec_text)
        before = observe(work)
        journal = tmp_path / f"rb{n}.sqlite"
        out = blktx("run", str(work / "t.toml"), "--journal", str(journal), env={"BLKTX_CRASH_AFTER": str(n)})
        if out.returncode == 1:
            assert observe(work) == before
            break
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
        tried += 1
        recover(journal)
        assert observe(work) == before, f"crash after write {n} of a rolling-back run"
        assert recover(journal) == [] and locks(journal) == []
    return tried


@needs_qemu_img
@pytest.mark.parametrize("phase", ["do", "invalidate"])
def test_qcow2_every_crash_point_of_a_rollback(tmp_path: Path, phase: str) -> None:
    spec = QCOW2_SPEC.replace(
        '[[action]]\ntype = "qcow2.internal-delete"',
        f'[[action]]\ntype = "fault"\nphase = "{phase}"\n[[action]]\ntype = "qcow2.internal-delete"',
    )
    assert "fault" in spec
    # begin, do intent, [do results + invalidate intent,] cancel intent, cancel results, end
    assert rollback_crash_points(tmp_path, _qcow2_setup, spec, world) >= (4 if phase == "do" else 5)


def test_the_cancel_intent_is_durable_before_any_cancel(tmp_path: Path) -> None:
    """Killed right after the cancel intent: nothing is cancelled yet, and the journal
    already holds what do learned (the snapshot's id) for recover to undo it."""
    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n[[action]]\ntype = "fault"\nphase = "do"\n'
    )
    journal = tmp_path / "j.sqlite"
    out = blktx("run", str(tmp_path / "t.toml"), "--journal", str(journal), env={"BLKTX_CRASH_AFTER": "4"})
    assert out.returncode == -signal.SIGKILL
    import sqlite3

    db = sqlite3.connect(journal)
    assert db.execute("SELECT phase, what FROM step ORDER BY id DESC LIMIT 1").fetchone() == ("cancel", "intent")
    (undo,) = db.execute("SELECT undo FROM action WHERE idx = 0").fetchone()
    assert json.loads(undo).get("id") == 1
    assert read_world(str(tmp_path / "sim-world.json"))["devices"]["a"]["snapshots"] == {"1": "n"}
    (done,) = recover(journal)
    assert done["outcome"] == "rolled back"
    assert read_world(str(tmp_path / "sim-world.json"))["devices"]["a"]["snapshots"] == {}


def test_forget_ends_what_recover_cannot_finish_and_releases_its_targets(tmp_path: Path) -> None:
    """A cancel command that keeps failing: recover says needs recovery again and
    again; a person settles it by hand and says so with --forget."""
    from blktx.locks import Locker

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n'
        '[[action]]\ntype = "exec"\ntarget = "x"\ndo = ["true"]\ncancel = ["false"]\n'
        '[[action]]\ntype = "fault"\nphase = "invalidate"\n'
    )
    journal = tmp_path / "j.sqlite"
    first = blktx("run", "--allow-exec", "--json", "--journal", str(journal), str(tmp_path / "t.toml"))
    assert first.returncode == 3, first.stdout
    txid = json.loads(first.stdout)["txid"]
    again = blktx("recover", "--allow-exec", "--json", "--journal", str(journal))
    assert again.returncode == 3 and [c["txid"] for c in Locker().claims()] == [txid]
    early = blktx("recover", "--forget", "--json", "--journal", str(journal), "nosuch")
    assert early.returncode == 2
    done = blktx("recover", "--forget", "--json", "--journal", str(journal), txid[:12])
    assert done.returncode == 0, done.stdout
    (item,) = json.loads(done.stdout)["transactions"]
    assert (item["state"], item["outcome"]) == ("ABORTED", "rolled back")
    assert Locker().claims() == [] and recover(journal) == []
    shown = blktx("show", "--json", "--journal", str(journal), txid)
    assert json.loads(shown.stdout)["detail"]["forgotten"]["from"] == "ROLLBACK_INCOMPLETE"


def test_recover_never_acts_on_a_copy_older_than_its_claim(tmp_path: Path) -> None:
    """The run commits (DONE) between recover's first read and its take-over of the
    claim: recover must read again under the claim and leave the committed world."""
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker
    from blktx.plugins import default_registry
    from blktx.recover import recover_one
    from blktx.states import TxState

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n')
    journal_path = tmp_path / "j.sqlite"
    out = blktx("run", str(tmp_path / "t.toml"), "--journal", str(journal_path), env={"BLKTX_CRASH_AFTER": "4"})
    assert out.returncode == -signal.SIGKILL
    journal = SqliteJournal(str(journal_path))
    (tx,) = journal.transactions()
    assert tx["status"] in ("RUNNING", "COMMITTED")
    world_after = read_world(str(tmp_path / "sim-world.json"))

    class Racing(Locker):
        def take_over(self, txid: str, journal_file: str, targets: Any) -> Any:
            journal.state(txid, TxState.DONE, {})  # the run finished meanwhile
            return super().take_over(txid, journal_file, targets)

    done = recover_one(journal, default_registry(), Racing(), tx["txid"])
    assert done["state"] == "DONE" and "finished while recover started" in done["message"]
    assert read_world(str(tmp_path / "sim-world.json")) == world_after and Locker().claims() == []


def test_forget_refuses_a_claim_whose_own_journal_knows_the_transaction(tmp_path: Path) -> None:
    from blktx.locks import Locker

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n')
    out = blktx(
        "run", "--json", str(tmp_path / "t.toml"), "--journal", str(tmp_path / "j1.sqlite"), env={"BLKTX_CRASH_AFTER": "2"}
    )
    assert out.returncode == -signal.SIGKILL
    (claim,) = Locker().claims()
    wrong = blktx("recover", "--forget", "--json", "--journal", str(tmp_path / "j2.sqlite"), claim["txid"])
    assert wrong.returncode == 2 and f"recover --journal {tmp_path / 'j1.sqlite'}" in wrong.stdout
    assert [c["txid"] for c in Locker().claims()] == [claim["txid"]], "the claim stays"
    nojournal = blktx("run", "--no-journal", str(tmp_path / "t.toml"))
    assert nojournal.returncode == 2 and "unfinished transaction" in nojournal.stdout, "a run without a journal too"
