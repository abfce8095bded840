from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from blktx import ActionSpec, Executor, Transaction
from blktx.journal import SqliteJournal
from blktx.locks import Locker
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
    tx = Transaction([ActionSpec("sim.snapshot", {"device": "a", "name": "n"}), ActionSpec("fault", {})], base_dir=str(tmp_path))
    result = Executor(registry, journal=journal, locker=Locker()).run(tx)
    assert result.outcome == "rolled back"
    (logged,) = journal.transactions()
    assert logged["status"] == "ABORTED" and logged["actions"] == 2 and not logged["committed"]
    shown = journal.transaction(result.txid[:12])
    assert [a["state"] for a in shown["actions"]] == ["CANCELED", "CANCELED"]
    assert shown["actions"][0]["undo"] == {"before": [], "id": 1}
    assert shown["detail"]["failure"]["type"] == "fault"
    assert Locker().claims() == [], "the claim is removed when the run ends"


def test_one_durable_write_per_batch_not_per_action(tmp_path: Path, registry) -> None:
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    Executor(registry, journal=journal, locker=Locker()).run(noop_tx([str(i) for i in range(500)]))
    # begin, intent of do, do's results with COMMITTED (no-op invalidates write
    # nothing), final states with DONE; the claim is a file of its own
    assert journal._writes == 4


def test_inside_a_quiesce_window_one_durable_write(tmp_path: Path, registry) -> None:
    """The do intent goes before the window; the window ends when the last step has
    returned; the results and the commit point are one write, after it."""
    from blktx import Hold, hookimpl
    from blktx.plugins import load

    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    seen: dict[str, int] = {}

    class Window:
        @hookimpl
        def blktx_quiesce(self, ctx, actions):
            holds = [Hold("test.window", "t")]
            ctx.holding(holds)  # journaled before it is taken
            seen["paused"] = journal._writes
            return holds

        @hookimpl
        def blktx_resume(self, ctx, hold):
            if hold.kind != "test.window":
                return None
            seen["resumed"] = journal._writes
            return True

    tx = Transaction([ActionSpec("sim.noop", {"key": str(i)}) for i in range(20)], options={"quiesce": "pause"}, base_dir="/tmp")
    result = Executor(load(extra=[("w", Window())]), journal=journal, locker=Locker()).run(tx)
    assert result.outcome == "committed"
    # inside the window: no durable write at all (the results and the commit point follow it)
    assert seen["resumed"] - seen["paused"] == 0
    assert journal._writes - seen["resumed"] >= 1, "the commit point is written after the window"
    (logged,) = journal.transactions()
    assert logged["committed"] and logged["status"] == "DONE"


def test_many_processes_opening_one_new_journal_at_once(tmp_path: Path) -> None:
    """A run and a `blktx recover` (or a watchdog) may create one journal together."""
    path = str(tmp_path / "j.sqlite")
    code = f"from blktx.journal import SqliteJournal; SqliteJournal({path!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(12)]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    assert errors == []
