"""Claims and kernel locks (blktx.locks) and lock keys (blktx.identity)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blktx import ActionSpec, Executor, InvalidTransaction, Transaction
from blktx.errors import BlktxError
from blktx.identity import lock_keys
from blktx.journal import SqliteJournal
from blktx.locks import Locker


def noop_tx(keys: list[str]) -> Transaction:
    return Transaction([ActionSpec("sim.noop", {"key": k}) for k in keys], base_dir="/tmp")


def journal_with(path: Path, txid: str, status: str) -> str:
    SqliteJournal(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO tx (txid, started, status, pid, actions) VALUES (?, 1, ?, 1, 1)", (txid, status))
    db.commit()
    return str(path)


def test_a_live_claim_refuses_a_second_run_naming_the_holder(tmp_path: Path) -> None:
    holder = Locker().acquire("tx-first", str(tmp_path / "a.sqlite"), ["sim:noop/b", "sim:noop/a"])
    try:
        journal = SqliteJournal(str(tmp_path / "b.sqlite"))
        result = Executor(journal=journal, locker=Locker()).run(noop_tx(["a", "z"]))
        assert result.outcome == "invalid" and result.exit_status == 2
        (problem,) = result.problems
        assert problem.target == "sim:noop/a"
        assert "held by running transaction tx-first" in problem.message and "--wait" in (problem.hint or "")
        assert journal.transactions() == [], "nothing was started"
    finally:
        Locker().release(holder, finished=True)
    assert Executor(journal=journal, locker=Locker()).run(noop_tx(["a"])).outcome == "committed"
    assert Locker().claims() == []


def test_wait_for_a_live_holder_in_another_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import time
from blktx.locks import Locker
claim = Locker().acquire("tx-holder", {str(tmp_path / "h.sqlite")!r}, ["sim:noop/a"])
print("locked", flush=True)
time.sleep(1.5)
Locker().release(claim, finished=True)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    t = time.monotonic()
    result = Executor(journal=SqliteJournal(str(tmp_path / "j.sqlite")), locker=Locker(wait=10)).run(noop_tx(["a"]))
    assert result.outcome == "committed" and time.monotonic() - t > 0.2
    holder.wait()


def test_a_dead_runs_unfinished_claim_is_refused_at_once_even_with_wait(tmp_path: Path) -> None:
    journal = journal_with(tmp_path / "dead.sqlite", "tx-dead", "RUNNING")
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from blktx.locks import Locker
Locker().acquire("tx-dead", {journal!r}, ["sim:noop/a"])  # exits holding it: the claim stays
""",
        ],
        check=True,
    )
    assert [c["live"] for c in Locker().claims()] == [False]
    t = time.monotonic()
    with pytest.raises(InvalidTransaction) as info:
        Locker(wait=30).acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    assert time.monotonic() - t < 5
    (problem,) = info.value.problems
    assert "unfinished transaction tx-dead" in problem.message and "blktx recover" in (problem.hint or "")
    # other targets are free
    Locker().release(Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/b"]), finished=True)


@pytest.mark.parametrize("status", ["DONE", "ABORTED", None])
def test_a_dead_runs_claim_of_an_ended_or_never_begun_transaction_is_stale(tmp_path: Path, status: str | None) -> None:
    journal = journal_with(tmp_path / "dead.sqlite", "tx-other", "DONE")
    if status is not None:
        journal = journal_with(tmp_path / "dead2.sqlite", "tx-dead", status)
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from blktx.locks import Locker
Locker().acquire("tx-dead", {journal!r}, ["sim:noop/a"])
""",
        ],
        check=True,
    )
    claim = Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    assert [c["txid"] for c in Locker().claims()] == ["tx-new"]
    Locker().release(claim, finished=True)


def test_a_claim_whose_journal_is_gone_keeps_its_targets(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from blktx.locks import Locker
Locker().acquire("tx-lost", {str(tmp_path / "gone.sqlite")!r}, ["sim:noop/a"])
""",
        ],
        check=True,
    )
    with pytest.raises(InvalidTransaction) as info:
        Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    assert "cannot be read" in info.value.problems[0].message


def test_release_keeps_the_claim_of_an_unfinished_transaction(tmp_path: Path) -> None:
    claim = Locker().acquire("tx-a", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    assert Locker().live("tx-a")
    Locker().release(claim, finished=False)
    (left,) = Locker().claims()
    assert left["txid"] == "tx-a" and not left["live"]


def test_lock_keys_are_identities(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "img").write_bytes(b"x")
    os.symlink("real", tmp_path / "alias")
    os.symlink("img", tmp_path / "real" / "dev")
    st = os.stat(tmp_path / "real" / "img")
    inode = f"inode:{st.st_dev}:{st.st_ino}"
    assert set(lock_keys(str(tmp_path / "alias" / "img"))) == set(lock_keys(str(tmp_path / "real" / "img")))
    assert inode in lock_keys(str(tmp_path / "real" / "dev"))
    assert lock_keys(str(tmp_path / "real" / "missing")) == [f"path:{tmp_path.resolve()}/real/missing"]
    assert lock_keys("vm:/run/vm.sock/drive0") == lock_keys("vm:/run/vm.sock/drive1")


def test_a_lock_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "locks"
    (folder / "claims").mkdir(parents=True)
    os.chmod(folder / "claims", 0o777)
    with pytest.raises(BlktxError, match="others can write"):
        Locker(str(folder))


def test_a_claim_whose_journal_is_lost_can_be_forgotten_by_a_person(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from blktx.locks import Locker
Locker().acquire("tx-lost", {str(tmp_path / "gone.sqlite")!r}, ["sim:noop/a"])
""",
        ],
        check=True,
    )
    with pytest.raises(InvalidTransaction) as info:
        Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    assert "blktx recover --forget tx-lost" in (info.value.problems[0].hint or "")
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "recover", "--forget", "--journal", str(tmp_path / "j.sqlite"), "tx-lost"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    Locker().release(Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"]), finished=True)


def test_a_half_written_claim_never_blocks_and_a_vm_socket_is_keyed_by_real_path(tmp_path: Path) -> None:
    claims = Path(Locker().dir) / "claims"
    (claims / ".tx-cut.json.999.tmp").write_bytes(b"")  # what a kill in the middle of a claim write leaves
    Locker().release(Locker().acquire("tx-new", str(tmp_path / "j.sqlite"), ["sim:noop/a"]), finished=True)
    (tmp_path / "vms").mkdir()
    os.symlink(tmp_path / "vms", tmp_path / "alias")
    assert lock_keys(f"vm:{tmp_path / 'vms' / 'vm.qmp'}/drive0") == lock_keys(f"vm:{tmp_path / 'alias' / 'vm.qmp'}/d1")


def test_sigterm_ends_a_wait_for_locks_at_once(tmp_path: Path) -> None:
    import signal

    holder = Locker().acquire("tx-holder", str(tmp_path / "h.sqlite"), ["sim:noop/a"])
    try:
        (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blktx",
                "run",
                "--wait",
                "30",
                "--json",
                "--journal",
                str(tmp_path / "j.sqlite"),
                str(tmp_path / "t.toml"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert time.monotonic() - t < 2, "the wait ended with the signal"
        assert proc.returncode == 1 and "interrupted by SIGTERM before anything was touched" in out
    finally:
        Locker().release(holder, finished=True)


def test_the_claim_is_on_disk_before_the_first_intent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim's fsyncs run beside the checks and BEGIN, but the run waits for them
    before anything may be touched: a slow fsync still comes before the do intent."""
    order: list[str] = []
    real_fsync, real_intent = os.fsync, SqliteJournal.intent

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real_fsync(fd)
        order.append("fsync")

    def intent(self: SqliteJournal, txid: str, phase: str, actions: object) -> None:
        order.append(f"intent {phase}")
        real_intent(self, txid, phase, actions)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(SqliteJournal, "intent", intent)
    result = Executor(journal=SqliteJournal(str(tmp_path / "j.sqlite")), locker=Locker()).run(noop_tx(["a"]))
    assert result.outcome == "committed"
    assert order[:3] == ["fsync", "fsync", "intent do"], order


def test_a_claim_that_cannot_be_made_durable_aborts_the_run_before_anything_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = Executor(journal=journal, locker=Locker()).run(noop_tx(["a", "b"]))
    monkeypatch.undo()
    assert result.outcome == "rolled back" and "Input/output error" in str(result.failure)
    assert [a.state for a in result.actions] == ["START", "START"], "no action began"
    db = sqlite3.connect(tmp_path / "j.sqlite")
    assert db.execute("SELECT status FROM tx").fetchall() == [("ABORTED",)]
    assert db.execute("SELECT DISTINCT state FROM action").fetchall() == [("START",)]
    assert Locker().claims() == [], "an aborted run leaves no claim"


@pytest.mark.parametrize("left", [b"", b"\0" * 145], ids=["empty", "zeros"])
def test_a_claim_a_power_loss_left_without_its_data_is_stale(tmp_path: Path, left: bytes) -> None:
    """The claim's fsyncs run after its rename: a power loss in between can leave the
    name without the data (ext4's delayed allocation: an empty file; seen on a
    loop-mounted ext4 copied at that moment). Its run never passed ``durable()``, so it
    touched nothing: the claim must not refuse every target of every later run."""
    claims = Path(os.environ["BLKTX_LOCK_DIR"]) / "claims"
    locker = Locker()
    (claims / "20261127T000000-cafe0001.json").write_bytes(left)
    claim = locker.acquire("tx-next", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
    locker.release(claim, finished=True)
    assert not (claims / "20261127T000000-cafe0001.json").exists()
    (claims / "20261127T000000-cafe0002.json").write_bytes(left)
    assert locker.sweep() == 1 and not (claims / "20261127T000000-cafe0002.json").exists()
    (claims / "20261127T000000-cafe0003.json").write_bytes(b"{not json")  # any other unreadable claim still refuses
    with pytest.raises(InvalidTransaction, match="unreadable"):
        locker.acquire("tx-last", str(tmp_path / "j.sqlite"), ["sim:noop/a"])
