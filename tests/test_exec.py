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
    result = run(tmp_path, [{"target": "a", "do": touch(marker), "cancel": rm(marker), "check": touch(marker)}], allow=False)
    assert result.outcome == "invalid" and result.exit_status == 2
    assert "not allowed" in result.problems[0].message and "--allow-exec" in (result.problems[0].hint or "")
    assert not marker.exists()


def test_exec_commits_and_rolls_back(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    result = run(tmp_path, [{"target": "a", "do": touch(a), "cancel": rm(a)}, {"target": "b", "do": touch(b), "cancel": rm(b)}])
    assert result.outcome == "committed" and a.exists() and b.exists()
    a.unlink()
    b.unlink()
    result = run(
        tmp_path,
        [{"target": "a", "do": touch(a), "cancel": rm(a)}, {"target": "b", "do": touch(b), "cancel": rm(b)}, {"type": "fault"}],
    )
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
    result = run(
        tmp_path,
        [
            {"target": "a", "do": touch(a), "cancel": rm(a)},
            {"target": "hang", "do": [PY, "-c", "import time; time.sleep(60)"], "cancel": [PY, "-c", "pass"], "timeout": 0.5},
        ],
    )
    assert time.monotonic() - t < 10
    assert result.outcome == "rolled back" and "timed out after 0.5 s" in result.failure.message
    assert not a.exists()


def test_check_command_refuses(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            {
                "target": "a",
                "do": touch(tmp_path / "x"),
                "cancel": rm(tmp_path / "x"),
                "check": [PY, "-c", "import sys; print('lv exists'); sys.exit(1)"],
            }
        ],
    )
    assert result.outcome == "invalid" and "lv exists" in result.problems[0].message
    assert not (tmp_path / "x").exists()


def test_output_environment_and_journal(tmp_path: Path) -> None:
    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    show = [PY, "-c", "import os; print(os.environ['BLKTX_PHASE'], os.environ['BLKTX_ACTION'], os.environ['SIZE'], os.getcwd())"]
    result = run(tmp_path, [{"target": "a", "do": show, "cancel": show, "env": {"SIZE": "1G"}}], journal=journal)
    assert result.outcome == "committed"
    expected = f"[do stdout] do 0 1G {tmp_path}\n"
    assert result.actions[0].output == expected
    assert journal.transaction(result.txid)["actions"][0]["output"] == expected


def test_commands_are_never_run_through_a_shell(tmp_path: Path) -> None:
    result = run(tmp_path, [{"target": "a", "do": ["echo hi; touch x"], "cancel": [PY, "-c", "pass"]}])
    assert result.outcome == "rolled back" and "cannot run echo hi; touch x" in result.failure.message
    assert not (tmp_path / "x").exists()


def _alive_with(marker: str) -> list[int]:
    import os

    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_daemon_that_keeps_stdout_open_never_hangs_the_run(tmp_path: Path) -> None:
    """`setsid sh -c 'sleep 1001' &` keeps the command's stdout open after it exits."""
    marker = f"sleep 1001.{tmp_path.name}"
    daemon = ["sh", "-c", f"setsid sh -c 'exec -a \"{marker}\" sleep 1001' & echo started"]
    t = time.monotonic()
    result = run(tmp_path, [{"target": "a", "do": daemon, "cancel": ["true"]}])
    try:
        assert result.outcome == "committed", result.summary()
        assert time.monotonic() - t < 5, "the run waited for the daemon's stdout"
        assert "started" in (result.actions[0].output or "")
    finally:
        for pid in _alive_with(marker):
            import os
            import signal

            os.kill(pid, signal.SIGKILL)


def test_a_timeout_kills_everything_the_command_started(tmp_path: Path) -> None:
    marker = f"sleep 1002.{tmp_path.name}"
    cmd = ["sh", "-c", f"setsid sh -c 'exec -a \"{marker}\" sleep 1002' & sleep 60"]
    t = time.monotonic()
    result = run(tmp_path, [{"target": "a", "do": cmd, "cancel": ["true"], "timeout": 1.0}])
    assert result.outcome == "rolled back" and "timed out" in result.failure.message
    assert time.monotonic() - t < 10
    time.sleep(0.2)
    assert _alive_with(marker) == [], "the setsid daemon was killed too"


def test_recover_runs_an_exec_cancel_only_with_allow_exec(tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess

    pwned = tmp_path / "PWNED"
    (tmp_path / "t.toml").write_text(
        f'version = 1\n[[action]]\ntype = "exec"\ntarget = "a"\ndo = ["true"]\ncancel = ["sh", "-c", "id > {pwned}"]\n'
    )
    journal = str(tmp_path / "j.sqlite")
    env = {**os.environ, "BLKTX_CRASH_AFTER": "2"}
    out = subprocess.run(
        [PY, "-m", "blktx", "run", "--allow-exec", "--journal", journal, str(tmp_path / "t.toml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == -signal.SIGKILL
    denied = subprocess.run(
        [PY, "-m", "blktx", "recover", "--json", "--journal", journal], capture_output=True, text=True, check=False
    )
    assert denied.returncode == 3 and not pwned.exists()
    assert "--allow-exec" in json.dumps(json.loads(denied.stdout))
    allowed = subprocess.run(
        [PY, "-m", "blktx", "recover", "--allow-exec", "--json", "--journal", journal],
        capture_output=True,
        text=True,
        check=False,
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert pwned.exists()


def test_bad_env_names_and_timeouts_are_refused_at_check(tmp_path: Path) -> None:
    for extra in ({"env": {"A=B": "c"}}, {"timeout": -1.0}, {"timeout": float("nan")}, {"timeout": float("inf")}):
        result = run(tmp_path, [{"target": "a", "do": ["true"], "cancel": ["true"], **extra}])
        assert result.outcome == "invalid", (extra, result.summary())
