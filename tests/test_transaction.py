"""The transaction as a machine: lock before check, hold until recovered, the commit
point is the durable write. Each test here is a reproduction that failed before the
transaction became a machine (issue "The transaction is the state machine")."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import chain, make_image, needs_qemu_img, snapshots

from blktx import ActionSpec, Executor, Transaction
from blktx.journal import SqliteJournal
from blktx.locks import Locker
from blktx.states import TX_TRANSITIONS, TxLifecycle, TxState
from blktx.status import STATUS
from blktx_plugins.sim import make_world, read_world


def blktx(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktx", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def external(device: str, overlay: str) -> str:
    return f'version = 1\n[[action]]\ntype = "qcow2.external-create"\ndevice = "{device}"\noverlay = "{overlay}"\n'


def exec_action(target: str, **argv: list[str]) -> str:
    text = f'[[action]]\ntype = "exec"\ntarget = "{target}"\n'
    for key, value in argv.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text


def device_setup(d: Path) -> None:
    make_image(d / "base.qcow2", pattern=0x33)
    os.symlink("base.qcow2", d / "dev")


# -- the machine ---------------------------------------------------------------------------


def test_every_state_has_one_status_and_the_graph_draws_every_transition() -> None:
    assert set(STATUS) == set(TxState)
    text = TxLifecycle.mermaid()
    for t in TX_TRANSITIONS:
        assert f"{t.source} --> {t.dest}: {t.trigger}" in text
    out = blktx("graph", "transaction")
    assert out.returncode == 0 and out.stdout == text


def test_the_machine_refuses_a_commit_that_did_not_run() -> None:
    assert not TxLifecycle.allowed("commit", TxState.CHECKED)
    assert not TxLifecycle.allowed("finalize", TxState.ROLLING_BACK)
    assert TxLifecycle.next("recover", TxState.RUNNING) is TxState.ROLLING_BACK
    assert TxLifecycle.next("recover", TxState.COMMITTED) is TxState.FINALIZING


# -- 1: a run that needs recovery keeps its targets ----------------------------------------------


@needs_qemu_img
def test_a_run_that_needs_recovery_keeps_its_targets_until_recover(tmp_path: Path) -> None:
    d = tmp_path / "D"
    d.mkdir()
    device_setup(d)
    (d / "r1.toml").write_text(
        external("dev", "ov1.qcow2")
        + exec_action("x", do=["true"], cancel=["true"], invalidate=["sh", "-c", f"chattr +i {d}; exit 1"])
    )
    (d / "r2.toml").write_text(external("dev", "ov2.qcow2"))
    try:
        first = blktx("run", "--allow-exec", "--json", str(d / "r1.toml"))
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    assert first.returncode == 3, first.stdout + first.stderr
    r1 = json.loads(first.stdout)["txid"]
    assert os.readlink(d / "dev") == "ov1.qcow2", "the immutable folder kept the switch"

    second = blktx("run", "--json", str(d / "r2.toml"))
    assert second.returncode == 2, second.stdout
    (problem,) = json.loads(second.stdout)["problems"]
    assert f"unfinished transaction {r1}" in problem["message"] and "blktx recover" in problem["hint"]
    assert not (d / "ov2.qcow2").exists()

    done = blktx("recover", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(d / "dev") == "base.qcow2" and not (d / "ov1.qcow2").exists()
    assert blktx("run", str(d / "r2.toml")).returncode == 0
    assert json.loads(blktx("recover", "--json").stdout)["transactions"] == []
    assert os.readlink(d / "dev") == "ov2.qcow2"
    assert chain(d / "dev") == ["dev", "base.qcow2"]  # dev is ov2, backed by the base


# -- 2, 3: checks run under the locks; --wait waits through the other's do -----------------------


@needs_qemu_img
@pytest.mark.parametrize("wait", [False, True])
def test_a_run_that_starts_during_anothers_checks_never_loses_its_snapshot(tmp_path: Path, wait: bool) -> None:
    d = tmp_path
    device_setup(d)
    (d / "B.toml").write_text(
        external("dev", "dev.B.qcow2") + exec_action("slow", check=["sleep", "2"], do=["true"], cancel=["true"])
    )
    (d / "A.toml").write_text(external("dev", "dev.A.qcow2"))
    b = subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", "--allow-exec", str(d / "B.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)
    a = blktx("run", "--json", *(["--wait", "30"] if wait else []), str(d / "A.toml"))
    assert b.wait(timeout=60) == 0
    if wait:
        assert a.returncode == 0, a.stdout + a.stderr
        assert os.readlink(d / "dev") == "dev.A.qcow2"
        assert chain(d / "dev") == ["dev", "dev.B.qcow2", "base.qcow2"], "A's overlay is on B's: nothing lost"
    else:
        assert a.returncode == 2, a.stdout
        (problem,) = json.loads(a.stdout)["problems"]
        assert "held by running transaction" in problem["message"] and problem["target"] == str(d / "dev")
        assert os.readlink(d / "dev") == "dev.B.qcow2" and not (d / "dev.A.qcow2").exists()


@needs_qemu_img
def test_wait_covers_the_other_runs_storage_daemon(tmp_path: Path) -> None:
    """The second run waits on the claim, never meets the first run's daemon at check."""
    d = tmp_path
    for i in range(20):
        make_image(d / f"i{i}.qcow2")
    body = "version = 1\n" + "".join(
        f'[[action]]\ntype = "qcow2.internal-create"\nimage = "i{i}.qcow2"\nname = "s{{n}}"\n' for i in range(20)
    )
    (d / "one.toml").write_text(body.replace("{n}", "1") + exec_action("slow", do=["sleep", "1"], cancel=["true"]))
    (d / "two.toml").write_text(body.replace("{n}", "2"))
    first = subprocess.Popen([sys.executable, "-m", "blktx", "run", "--allow-exec", str(d / "one.toml")])
    time.sleep(0.7)
    second = blktx("run", "--wait", "60", str(d / "two.toml"))
    assert first.wait(timeout=60) == 0
    assert second.returncode == 0, second.stdout + second.stderr
    assert [n for _, n in snapshots(d / "i7.qcow2")] == ["s1", "s2"]


# -- 4: one target however it is spelt, whichever journal -------------------------------------


@needs_qemu_img
def test_one_device_through_a_symlinked_folder_and_another_journal_is_one_target(tmp_path: Path) -> None:
    d = tmp_path / "real"
    d.mkdir()
    device_setup(d)
    os.symlink(d, tmp_path / "alias")
    holder = Locker().acquire("tx-holder", str(tmp_path / "other.sqlite"), [str(d / "dev")])
    try:
        (tmp_path / "alias" / "t.toml").write_text(external("dev", "ov.qcow2"))
        out = blktx("run", "--json", "--journal", str(tmp_path / "mine.sqlite"), str(tmp_path / "alias" / "t.toml"))
        assert out.returncode == 2, out.stdout
        assert "tx-holder" in json.loads(out.stdout)["problems"][0]["message"]
    finally:
        Locker().release(holder, finished=True)
    # the image the device points at is the same target as the device
    holder = Locker().acquire("tx-image", str(tmp_path / "other.sqlite"), [str(d / "base.qcow2")])
    try:
        out = blktx("run", "--json", str(d / "t.toml"))
        assert out.returncode == 2 and "tx-image" in out.stdout
    finally:
        Locker().release(holder, finished=True)
    assert blktx("run", str(d / "t.toml")).returncode == 0


# -- 5: liveness by kernel lock, not by pid ---------------------------------------------------------


def test_a_run_in_another_pid_namespace_is_alive(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    journal = tmp_path / "j.sqlite"
    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n'
        '[[action]]\ntype = "exec"\ntarget = "slow"\ndo = ["sleep", "3"]\ncancel = ["true"]\n'
    )
    inside = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "blktx",
            "run",
            "--allow-exec",
            "--journal",
            str(journal),
            str(tmp_path / "t.toml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (journal.exists() and SqliteJournal(str(journal)).transactions()):
        time.sleep(0.05)
    out = blktx("recover", "--json", "--journal", str(journal))
    (item,) = json.loads(out.stdout)["transactions"]
    assert item["outcome"] == "running", item
    assert out.returncode == 0, "a live run is left to itself: not a failure of recover"
    assert inside.wait(timeout=30) == 0, inside.stderr
    assert read_world(str(tmp_path / "sim-world.json"))["devices"]["a"]["snapshots"], "the live run committed"
    assert json.loads(blktx("recover", "--json", "--journal", str(journal)).stdout)["transactions"] == []


# -- 6: the commit point is the durable write -------------------------------------------------------


class FailingJournal(SqliteJournal):
    """A journal whose chosen write fails, as on a full disk."""

    def __init__(self, path: str, fail: str) -> None:
        super().__init__(path)
        self.fail = fail

    def state(self, txid: str, state: TxState, detail: dict[str, Any]) -> None:
        if self.fail == "commit" and state is TxState.COMMITTED:
            raise sqlite3.OperationalError("database or disk is full")
        super().state(txid, state, detail)

    def intent(self, txid: str, phase: str, actions: Any) -> None:
        if self.fail == phase:
            raise sqlite3.OperationalError("database or disk is full")
        super().intent(txid, phase, actions)

    def begin(self, txid: str, info: dict[str, Any], actions: Any) -> None:
        if self.fail == "begin":
            raise sqlite3.OperationalError("database or disk is full")
        super().begin(txid, info, actions)


def sim_world(tmp_path: Path) -> str:
    path = str(tmp_path / "sim-world.json")
    make_world(
        path,
        {
            "a": {"snapshots": {"1": "old"}, "layers": ["a0"], "active": "a0"},
            "b": {"snapshots": {}, "layers": ["b0"], "active": "b0"},
        },
    )
    return path


def snapshot_then_delete_old() -> list[ActionSpec]:
    return [
        ActionSpec("sim.snapshot", {"device": "a", "name": "new"}),
        ActionSpec("sim.overlay", {"device": "b", "layer": "b1"}),
        ActionSpec("sim.delete", {"device": "a", "name": "old"}),
    ]


def test_a_failed_commit_write_rolls_back_and_never_finalizes(tmp_path: Path) -> None:
    path = sim_world(tmp_path)
    before = read_world(path)
    journal = FailingJournal(str(tmp_path / "j.sqlite"), "commit")
    result = Executor(journal=journal, locker=Locker()).run(Transaction(snapshot_then_delete_old(), base_dir=str(tmp_path)))
    assert result.outcome == "rolled back" and not result.committed, result.summary()
    assert "disk is full" in str(result.failure)
    assert read_world(path) == before, "the old snapshot is kept and the new one removed"
    assert "finalize" not in result.phases
    assert journal.transactions()[0]["status"] == "ABORTED"
    assert Locker().claims() == []


@needs_qemu_img
def test_a_failed_commit_write_keeps_the_replaced_qcow2_snapshot(tmp_path: Path) -> None:
    make_image(tmp_path / "a.qcow2", snapshots=("nightly",))
    before = snapshots(tmp_path / "a.qcow2")
    journal = FailingJournal(str(tmp_path / "j.sqlite"), "commit")
    result = Executor(journal=journal, locker=Locker()).run(
        Transaction(
            [ActionSpec("qcow2.internal-create", {"image": "a.qcow2", "name": "nightly", "replace": True})],
            base_dir=str(tmp_path),
        )
    )
    assert result.outcome == "rolled back", result.summary()
    assert snapshots(tmp_path / "a.qcow2") == before


# -- 7: a failed cancel intent still rolls back; a refused BEGIN is invalid ---------------------------


def test_a_failed_cancel_intent_still_rolls_back(tmp_path: Path) -> None:
    path = sim_world(tmp_path)
    before = read_world(path)
    journal = FailingJournal(str(tmp_path / "j.sqlite"), "cancel")
    actions = [*snapshot_then_delete_old()[:2], ActionSpec("fault", {"phase": "invalidate"})]
    result = Executor(journal=journal, locker=Locker()).run(Transaction(actions, base_dir=str(tmp_path)))
    assert result.outcome == "rolled back", result.summary()
    assert read_world(path) == before
    assert any("cancel intent could not be journaled" in w for w in result.warnings)


def test_a_refused_begin_is_invalid_and_touches_nothing(tmp_path: Path) -> None:
    path = sim_world(tmp_path)
    before = read_world(path)
    journal = FailingJournal(str(tmp_path / "j.sqlite"), "begin")
    result = Executor(journal=journal, locker=Locker()).run(Transaction(snapshot_then_delete_old(), base_dir=str(tmp_path)))
    assert result.outcome == "invalid" and result.exit_status == 2
    assert "refused BEGIN" in result.problems[0].message
    assert read_world(path) == before and Locker().claims() == []


def test_an_unwritable_journal_refuses_with_exit_2(tmp_path: Path) -> None:
    sim_world(tmp_path)
    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n')
    (tmp_path / "ro").mkdir()
    journal = tmp_path / "ro" / "j.sqlite"
    SqliteJournal(str(journal)).close()
    os.chmod(journal, 0o400)
    subprocess.run(["chattr", "+i", str(journal)], check=True)
    try:
        out = blktx("run", "--journal", str(journal), str(tmp_path / "t.toml"))
    finally:
        subprocess.run(["chattr", "-i", str(journal)], check=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr


# -- 9: a rerun after a kill is told about the transaction, once per target ---------------------------


@needs_qemu_img
def test_a_rerun_after_a_kill_names_the_unfinished_transaction_only(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / f"d{i}.qcow2")
    spec = "version = 1\n" + "".join(
        f'[[action]]\ntype = "qcow2.internal-create"\nimage = "d{i}.qcow2"\nname = "nightly"\n' for i in range(3)
    )
    (tmp_path / "t.toml").write_text(spec)
    killed = blktx("run", str(tmp_path / "t.toml"), env={"BLKTX_CRASH_AFTER": "2"})
    assert killed.returncode == -9
    out = blktx("run", "--json", str(tmp_path / "t.toml"))
    assert out.returncode == 2
    problems = json.loads(out.stdout)["problems"]
    assert len(problems) == 3 and {p["target"] for p in problems} == {str(tmp_path / f"d{i}.qcow2") for i in range(3)}
    assert all(p["message"].startswith("target is held by unfinished transaction") for p in problems)
    assert all("blktx recover" in p["hint"] for p in problems)
    assert blktx("recover").returncode == 0
    assert blktx("run", str(tmp_path / "t.toml")).returncode == 0


# -- 10: options declared once, retries >= 0 -----------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("cancel_retries", -1),
        ("finalize_retries", -3),
        ("retry_delay", -0.5),
        ("retry_delay", float("nan")),
        ("jobs", 0),
        ("cancel_retries", 10**9),
    ],
)
def test_retries_and_delays_out_of_range_are_refused(tmp_path: Path, option: str, value: Any) -> None:
    sim_world(tmp_path)
    result = Executor().run(
        Transaction([ActionSpec("sim.snapshot", {"device": "a", "name": "n"})], options={option: value}, base_dir=str(tmp_path))
    )
    assert result.outcome == "invalid"
    assert result.problems[0].key == option and "must be" in result.problems[0].message


# -- 11: SIGHUP, and an interrupt before the locks ------------------------------------------------------


def test_an_interrupt_before_the_run_is_honoured_and_touches_nothing(tmp_path: Path) -> None:
    path = sim_world(tmp_path)
    before = read_world(path)
    executor = Executor(journal=SqliteJournal(str(tmp_path / "j.sqlite")), locker=Locker())
    executor.interrupt("test")
    result = executor.run(Transaction(snapshot_then_delete_old(), base_dir=str(tmp_path)))
    assert result.outcome == "rolled back" and "before anything was touched" in str(result.failure)
    assert read_world(path) == before and Locker().claims() == []
    again = executor.run(Transaction(snapshot_then_delete_old(), base_dir=str(tmp_path)))
    assert again.outcome == "committed", "the next run starts uninterrupted"


def test_sighup_rolls_back_like_sigterm(tmp_path: Path) -> None:
    path = sim_world(tmp_path)
    before = read_world(path)
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n'
        '[[action]]\ntype = "exec"\ntarget = "slow"\ndo = ["sleep", "2"]\ncancel = ["true"]\n'
        '[[action]]\ntype = "sim.overlay"\ndevice = "b"\nlayer = "b1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", "--allow-exec", "--json", str(tmp_path / "t.toml")],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read_world(path) == before:
        time.sleep(0.02)
    proc.send_signal(1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert json.loads(out)["failure"]["message"].startswith("interrupted by SIGHUP")
    assert read_world(path) == before


class MakesAFile:
    """A plugin whose action creates the file at ``out`` (a path declared ``creates``)."""

    from blktx import hookimpl as _hookimpl

    @_hookimpl
    def blktx_register_action_types(self, register: Any) -> None:
        from blktx import Action, ActionType, Param

        class Make(ActionType):
            name = "make.file"
            params = (Param("key", "str", required=True), Param("out", "path", required=True, creates=True))

            def target(self, action: Action) -> str:
                return "make:" + str(action.params["key"])

            def do(self, action: Action, ctx: Any) -> None:
                Path(action.params["out"]).write_text("x")

            def cancel(self, action: Action, ctx: Any) -> None:
                return None

        register(Make)


def test_two_actions_creating_one_file_are_refused_and_created_paths_are_locked(tmp_path: Path) -> None:
    from blktx.plugins import load

    registry = load(extra=[("make", MakesAFile())])
    twice = Transaction(
        [ActionSpec("make.file", {"key": "a", "out": "o.txt"}), ActionSpec("make.file", {"key": "b", "out": "./o.txt"})],
        base_dir=str(tmp_path),
    )
    result = Executor(registry).run(twice)
    assert result.outcome == "invalid" and not (tmp_path / "o.txt").exists()
    (problem,) = result.problems
    assert problem.action == 1 and f"creates {tmp_path / 'o.txt'}, as action #0 (make.file) does" in problem.message
    holder = Locker().acquire("tx-other", str(tmp_path / "o.sqlite"), [str(tmp_path / "o.txt")])
    try:
        once = Transaction([ActionSpec("make.file", {"key": "c", "out": "o.txt"})], base_dir=str(tmp_path))
        result = Executor(registry, journal=SqliteJournal(str(tmp_path / "j.sqlite")), locker=Locker()).run(once)
        assert result.outcome == "invalid" and "tx-other" in result.problems[0].message
    finally:
        Locker().release(holder, finished=True)
