"""The watchdog's own start and stop (blktx.watchdog): both are on a run's way, the
start before its quiesce window opens, the stop before it exits. No VMs needed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blktx import watchdog
from blktx.watchdog import _BOOT, Watchdog, _parse, _quick


def test_the_command_line_the_run_writes_is_read_without_argparse() -> None:
    argv = ["--journal", "/j.sqlite", "--txid", "20261127T1200-ab", "--budget", "30.0", "--pid", "4242", "--ready"]
    got = _quick(argv)
    assert got is not None
    assert (got.journal, got.txid, got.budget, got.pid, got.ready) == ("/j.sqlite", "20261127T1200-ab", 30.0, 4242, True)
    unready = _quick(argv[:-1])
    assert unready is not None and not unready.ready
    odd = [
        ["--help"],
        ["--journal=/j.sqlite", *argv[2:]],
        argv[:-3],  # no --pid
        [*argv, "--pid", "1"],  # twice
        ["--journal", "-x", *argv[2:]],
        [*argv[:5], "soon", *argv[6:]],  # --budget not a number
        [*argv, "--verbose"],
    ]
    for args in odd:
        assert _quick(args) is None, args
    # anything else is argparse's, as before: the same values, or its refusal
    parsed = _parse(["--pid", "7", "--budget", "1.5", "--txid", "t", "--journal=/k"])
    assert (parsed.journal, parsed.txid, parsed.budget, parsed.pid, parsed.ready) == ("/k", "t", 1.5, 7, False)
    with pytest.raises(SystemExit):
        _parse(argv[:-3])


def test_the_watchdog_process_starts_light(tmp_path: Path) -> None:
    """Only what watching needs: not argparse, signal.py's enum, importlib.util, nor
    blktx (site is off too); it says it is ready, and a 'd' ends it at once."""
    boot = [sys.executable, "-S", "-X", "importtime", "-c", _BOOT, os.path.abspath(watchdog.__file__)]
    argv = ["--journal", str(tmp_path / "j.sqlite"), "--txid", "t", "--budget", "1", "--pid", str(os.getpid()), "--ready"]
    done = subprocess.run([*boot, *argv], input=b"d", capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"r"
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines() if line.startswith("import time:")}
    assert "select" in imported
    heavy = {"argparse", "enum", "importlib.util", "signal", "subprocess", "site", "blktx", "typing"}
    assert not imported & heavy, imported & heavy
    assert not (tmp_path / "j.sqlite").exists(), "a watchdog that only watched never opened the journal"


def test_stop_reaps_a_watchdog_that_only_watched(tmp_path: Path) -> None:
    dog = Watchdog(str(tmp_path / "j.sqlite"), "t", 30.0)
    dog.window_opened()  # waits until it is ready
    dog.window_closed()
    t = time.monotonic()
    dog.stop()
    assert dog.proc.returncode == 0
    assert time.monotonic() - t < 2.0


def test_end_exits_at_once_only_when_nothing_was_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exited(Exception):
        pass

    def fake_exit(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(watchdog, "_acted", False)
    with pytest.raises(Exited) as quick:
        watchdog.end(0)
    assert quick.value.args == (0,)
    monkeypatch.setattr(watchdog, "_acted", True)  # plugins' atexit, the journal's close: the interpreter's exit
    with pytest.raises(SystemExit) as normal:
        watchdog.end(1)
    assert normal.value.code == 1
