from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from blktx import ActionSpec, Executor, Transaction
from blktx.journal import SqliteJournal
from blktx.plugins import default_registry

PY = sys.executable


def touch(path: Path) -> list[str]:
    return [PY, "-c", f"open({str(path)!r}, 'a').close()"]


def rm(path: Path) -> list[str]:
    return [PY, "-c", f"import os; os.path.exists({str(path)!r}) and os.unlink({str(path)!r})"]


def run(tmp: Path, actions: list[dict[str, Any]], allow: bool = True, journal: SqliteJournal | None = None):
    tx = Transaction([ActionSpec(a.pop("type", "exec"), a) for a in actions], base_dir=str(tmp))
    return Executor(default_registry(), journal=journal).run(tx, allow_exec=allow)


def test_exec_is_refused_before_anything_runs_unless_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = run(tmp_path, [{"target": "a", "do": touch(marker), "cancel": rm(marker), "check": touch(marker)}],
                 allow=False)
    assert result.outcome == "invalid" and result.exit_status == 2
    assert "not allowed" in result.problems[0].message and "--allow-exec" in (result.problems[0].hint or "")
    assert not marker.exists()


def test_exec_commits_and_rolls_back(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    result = run(tmp_path, [{"target": "a", "do": touch(a), "cancel": rm(a)},
                            {"target": "b", "do": touch(b), "cancel": rm(b)}])
    assert result.outcome == "committed" and a.exists() and b.exists()
    a.unlink()
    b.unlink()
    result = run(tmp_path, [{"target": "a", "do": touch(a), "cancel": rm(a)},
                            {"target": "b", "do": touch(b), "cancel": rm(b)}, {"type": "fault"}])
    assert result.outcome == "rolled back" and not a.exists() and not b.exists()


def test_nonzero_exit_shows_stderr(tmp_path: Path) -> None:
    fail = [PY, "-c", "import sys; sys.stderr.write('volume group vg0 not found'); sys.exit(5)"]
    result = run(tmp_path, [{"target": "lvm:vg0/root", "do": fail, "cancel": [PY, "-c", "pass"]}])
    assert result.outcome == "rolled back"
    assert result.failure is not None and result.failure.target == "exec:lvm:vg0/root"
    assert "exited 5: volume group vg0 not found" in result.failure.message


def test_a_hanging_command_is_killed_at_its_timeout_and_rolled_back(tmp_path: Path) -> None:
    a = tmp_path / "a"
    t = time.monotonic()
    result = run(tmp_path, [{"target": "a", "do": touch(a), "cancel": rm(a)},
                            {"target": "hang", "do": [PY, "-c", "import time; time.sleep(60)"],
                             "cancel": [PY, "-c", "pass"], "timeout": 0.5}])
    assert time.monotonic() - t < 10
    assert result.outcome == "rolled back" and "timed out after 0.5 s" in result.failure.message
    assert not a.exists()


def test_check_command_refuses(tmp_path: Path) -> None:
    result = run(tmp_path, [{"target": "a", "do": touch(tmp_path / "x"), "cancel": rm(tmp_path / "x"),
                             "check": [PY, "-c", "import sys; print('lv exists'); sys.exit(1)"]}])
    assert result.outcome == "invalid" and "lv exists" in result.problems[0].message
    assert not (tmp_path / "x").exists()


def test_output_environment_and_journal(tmp_path: Path) -> None:
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    show = [PY, "-c", "import os; print(os.environ['BLKTX_PHASE'], os.environ['BLKTX_ACTION'], os.environ['SIZE'], "
                      "os.getcwd())"]
    result = run(tmp_path, [{"target": "a", "do": show, "cancel": show, "env": {"SIZE": "1G"}}], journal=journal)
    assert result.outcome == "committed"
    expected = f"[do stdout] do 0 1G {tmp_path}\n"
    assert result.actions[0].output == expected
    assert journal.transaction(result.txid)["actions"][0]["output"] == expected


def test_commands_are_never_run_through_a_shell(tmp_path: Path) -> None:
    result = run(tmp_path, [{"target": "a", "do": ["echo hi; touch x"], "cancel": [PY, "-c", "pass"]}])
    assert result.outcome == "rolled back" and "cannot run echo hi; touch x" in result.failure.message
    assert not (tmp_path / "x").exists()
