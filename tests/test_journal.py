from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blktx import ActionSpec, Executor, InvalidTransaction, Transaction
from blktx.journal import SqliteJournal
from blktx_plugins.sim import make_world


def noop_tx(keys: list[str]) -> Transaction:
    return Transaction([ActionSpec("sim.noop", {"key": k}) for k in keys], base_dir="/tmp")


def test_journal_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    journal = SqliteJournal(str(tmp_path / "state" / "j.sqlite"))
    assert stat.S_IMODE(os.stat(journal.path).st_mode) == 0o600
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_records_every_action_and_outcome(tmp_path: Path, registry) -> None:
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    make_world(str(tmp_path / "sim-world.json"), ["a"])
    tx = Transaction([ActionSpec("sim.snapshot", {"device": "a", "name": "n"}), ActionSpec("fault", {})],
                     base_dir=str(tmp_path))
    result = Executor(registry, journal=journal, locker=journal).run(tx)
    assert result.outcome == "rolled back"
    (logged,) = journal.transactions()
    assert logged["status"] == "ABORTED" and logged["actions"] == 2 and not logged["committed"]
    shown = journal.transaction(result.txid[:12])
    assert [a["state"] for a in shown["actions"]] == ["CANCELED", "CANCELED"]
    assert shown["actions"][0]["undo"] == {"before": [], "id": 1}
    assert shown["detail"]["failure"]["type"] == "fault"
    assert shown["locks"] == [], "locks are released when the run ends"


def test_one_durable_write_per_batch_not_per_action(tmp_path: Path, registry) -> None:
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    Executor(registry, journal=journal, locker=journal).run(noop_tx([str(i) for i in range(500)]))
    # lock, begin, intent of do, do's results with COMMITTED (no-op invalidates write
    # nothing), final states, outcome, unlock
    assert journal._writes == 7


def test_inside_a_quiesce_window_one_durable_write(tmp_path: Path, registry) -> None:
    """The do intent goes before the window; the results and the commit point are one write."""
    from blktx import Hold, hookimpl
    from blktx.plugins import load

    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    seen: dict[str, int] = {}

    class Window:
        @hookimpl
        def blktx_quiesce(self, ctx, actions):
            seen["paused"] = journal._writes
            return [Hold("test.window", "t")]

        @hookimpl
        def blktx_resume(self, ctx, hold):
            if hold.kind != "test.window":
                return None
            seen["resumed"] = journal._writes
            return True

    tx = Transaction([ActionSpec("sim.noop", {"key": str(i)}) for i in range(20)], options={"quiesce": "pause"},
                     base_dir="/tmp")
    result = Executor(load(extra=[("w", Window())]), journal=journal, locker=journal).run(tx)
    assert result.outcome == "committed"
    # the hold itself is journaled when the hook returns (it did not announce it), then one write
    assert seen["resumed"] - seen["paused"] == 2
    (logged,) = journal.transactions()
    assert logged["committed"] and logged["status"] == "DONE"


def test_second_run_on_a_locked_target_is_refused_naming_the_holder(tmp_path: Path, registry) -> None:
    path = str(tmp_path / "j.sqlite")
    first = SqliteJournal(path)
    with first.acquire("tx-first", ["sim:noop/b", "sim:noop/a"]):
        second = SqliteJournal(path)
        result = Executor(registry, journal=second, locker=second).run(noop_tx(["a", "z"]))
        assert result.outcome == "invalid" and result.exit_status == 2
        (problem,) = result.problems
        assert problem.target == "sim:noop/a"
        assert f"locked by transaction tx-first (pid {os.getpid()})" in problem.message
        assert second.transactions() == [], "nothing was started"
    assert Executor(registry, journal=second, locker=second).run(noop_tx(["a"])).outcome == "committed"


def test_wait_for_a_lock(tmp_path: Path, registry) -> None:
    path = str(tmp_path / "j.sqlite")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from blktx.journal import SqliteJournal
with SqliteJournal({path!r}).acquire("tx-holder", ["sim:noop/a"]):
    print("locked", flush=True)
    time.sleep(1.5)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    journal = SqliteJournal(path, wait=10)
    t = time.monotonic()
    result = Executor(registry, journal=journal, locker=journal).run(noop_tx(["a"]))
    assert result.outcome == "committed" and time.monotonic() - t > 0.2
    holder.wait()


def test_a_lock_of_a_dead_process_with_an_unfinished_transaction_needs_recover(tmp_path: Path, registry) -> None:
    path = str(tmp_path / "j.sqlite")
    db = sqlite3.connect(path)
    SqliteJournal(path)  # creates the schema
    db.execute("INSERT INTO tx (txid, started, status, pid, actions) VALUES ('tx-dead', 1, 'BEGIN', 999999, 1)")
    db.execute("INSERT INTO lock VALUES ('sim:noop/a', 'tx-dead', 999999, 'x', 1)")
    db.execute("INSERT INTO lock VALUES ('sim:noop/b', 'tx-gone', 999999, 'x', 1)")
    db.commit()
    journal = SqliteJournal(path)
    with pytest.raises(InvalidTransaction) as info:
        with journal.acquire("tx-new", ["sim:noop/a"]):
            pass
    assert "unfinished transaction tx-dead" in str(info.value) and "blktx recover" in info.value.problems[0].hint
    # a dead holder whose transaction is not in the journal is simply cleared
    with journal.acquire("tx-new", ["sim:noop/b"]):
        pass
