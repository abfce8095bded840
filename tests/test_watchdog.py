"""The dead-man switch (blktx.watchdog) and the window budget, on live VMs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, needs_qemu_system

from blktx import ActionSpec, Executor, Hold, Transaction, hookimpl
from blktx.journal import Fenced, SqliteJournal
from blktx.locks import Locker
from blktx.plugins import load
from blktx.states import TxState

pytestmark = needs_qemu_system


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[VM]]:
    machines = [VM(tmp_path, f"vm{i}", drives=1) for i in range(3)]
    try:
        yield machines
    finally:
        for vm in machines:
            vm.quit()


def spec(tmp_path: Path, sleep: float, max_window: str = "30s") -> Path:
    text = f'version = 1\n[options]\nquiesce = "pause"\nmax_window = "{max_window}"\n'
    for i in range(3):
        text += f'[[action]]\ntype = "qmp.internal-create"\nvm = "vm{i}.qmp"\ndrive = "drive0"\nname = "nightly"\n'
    # an exec do runs inside the window: it keeps the VMs paused for `sleep` seconds
    text += f'[[action]]\ntype = "exec"\ntarget = "slow"\ndo = ["sleep", "{sleep}"]\ncancel = ["true"]\n'
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def start(path: Path, journal: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", "--allow-exec", "--json", "--journal", str(journal), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_paused(vms: list[VM], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(vm.running() for vm in vms):
            return
        time.sleep(0.02)
    raise AssertionError("the run never paused the VMs")


def seconds_until_running(vms: list[VM], timeout: float = 10) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if all(vm.running() for vm in vms):
            return time.monotonic() - t
        time.sleep(0.01)
    raise AssertionError(f"VMs still paused after {timeout} s: {[vm.running() for vm in vms]}")


def recover(journal: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "recover", "--allow-exec", "--json", "--journal", str(journal)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["transactions"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8])
def test_a_run_killed_inside_the_window_has_its_vms_resumed_without_recover(tmp_path: Path, vms: list[VM], delay: float) -> None:
    journal = tmp_path / "j.sqlite"
    proc = start(spec(tmp_path, 3), journal)
    wait_paused(vms)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seconds_until_running(vms) < 1.0, "the watchdog resumes every VM within a second"
    (done,) = recover(journal)
    assert done["outcome"] == "rolled back"
    assert all(vm.snapshots(0) == [] for vm in vms) and all(vm.running() for vm in vms)
    steps = SqliteJournal(str(journal))._db.execute("SELECT phase, what FROM step WHERE phase = 'watchdog'").fetchall()
    assert steps == [("watchdog", "fence")]


def test_a_stopped_run_is_taken_over_at_its_budget(tmp_path: Path, vms: list[VM]) -> None:
    journal = tmp_path / "j.sqlite"
    proc = start(spec(tmp_path, 0.5, max_window="1s"), journal)
    wait_paused(vms)
    proc.send_signal(signal.SIGSTOP)
    t = time.monotonic()
    seconds_until_running(vms, timeout=10)
    took = time.monotonic() - t
    assert 0.5 < took < 4.0, f"resumed {took:.2f} s after the stop (budget 1 s + grace 1 s)"
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (1, 3), f"woken, the fenced run must not commit: exit {proc.returncode}\n{out}{err}"
    assert json.loads(out)["committed"] is False
    assert all(done["outcome"] == "rolled back" for done in recover(journal))
    assert all(vm.snapshots(0) == [] and vm.running() for vm in vms)
    (why,) = SqliteJournal(str(journal))._db.execute("SELECT why FROM fence").fetchone()
    assert "connection(s) were shut down" in why, f"severed, not killed: {why}"


def test_a_window_past_its_budget_rolls_back_in_the_run(tmp_path: Path, vms: list[VM]) -> None:
    journal = tmp_path / "j.sqlite"
    # 0.6 s in the window: past its 0.3 s budget, well before the watchdog acts (0.3 s + GRACE)
    proc = start(spec(tmp_path, 0.6, max_window="300ms"), journal)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    result = json.loads(out)
    assert "outlasted max_window" in result["failure"]["message"]
    assert all(vm.running() and vm.snapshots(0) == [] for vm in vms)
    assert Locker().claims() == []


def test_a_run_that_ends_normally_leaves_no_watchdog(tmp_path: Path, vms: list[VM]) -> None:
    journal = tmp_path / "j.sqlite"
    proc = start(spec(tmp_path, 0.0), journal)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert all(vm.snapshots(0) == ["nightly"] and vm.running() for vm in vms)
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"--journal {journal} --txid"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the watchdog exited with the run"


def test_a_fenced_transaction_cannot_commit(tmp_path: Path) -> None:
    """The commit write itself refuses a fenced transaction (one SQLite write)."""
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))

    class FenceInside:
        @hookimpl
        def blktx_quiesce(self, ctx: Any, actions: Any) -> None:
            ctx.holding([Hold("t.pause", "x")])
            journal.fence(ctx.txid, "test: the window was broken")

        @hookimpl
        def blktx_resume(self, ctx: Any, hold: Hold) -> bool | None:
            return True if hold.kind == "t.pause" else None

    from blktx_plugins.sim import make_world, read_world

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    result = Executor(load(extra=[("f", FenceInside())]), journal=journal, locker=Locker()).run(
        Transaction(
            [ActionSpec("sim.snapshot", {"device": "a", "name": "n"})], options={"quiesce": "pause"}, base_dir=str(tmp_path)
        )
    )
    assert result.outcome == "rolled back" and "fenced" in str(result.failure)
    assert read_world(str(tmp_path / "sim-world.json"))["devices"]["a"]["snapshots"] == {}
    with pytest.raises(Fenced):
        journal.state(result.txid, TxState.COMMITTED, {})
    committed = Executor(journal=journal, locker=Locker()).run(
        Transaction([ActionSpec("sim.snapshot", {"device": "a", "name": "m"})], base_dir=str(tmp_path))
    )
    assert committed.outcome == "committed"
    assert journal.fence(committed.txid, "too late") is False, "a durable commit is never fenced"


def test_the_cut_is_proven_inside_the_common_window(tmp_path: Path, vms: list[VM]) -> None:
    journal = tmp_path / "j.sqlite"
    proc = start(spec(tmp_path, 0.0), journal)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    cut = json.loads(out)["cut"]
    assert cut["inside"] is True and cut["holds"] == 3
    assert cut["clock"] == "qemu", "the window's bounds are the VMs' own STOP and RESUME events"
    snaps = [m for m in cut["members"] if m["action"] < 3]
    assert len(snaps) == 3 and all(m["inside"] and m["step"] == "do" for m in snaps)
    assert all(0 <= m["began_ms"] <= m["ended_ms"] <= cut["common_window_ms"] for m in snaps)
    shown = subprocess.run(
        [sys.executable, "-m", "blktx", "show", json.loads(out)["txid"], "--journal", str(journal)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "point in time: 4 member(s) taken inside the common window of 3 hold(s)" in shown.stdout
