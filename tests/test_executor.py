from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from blktx import Action, ActionSpec, ActionType, Executor, Hold, Param, Transaction, hookimpl
from blktx.context import Options, RunContext
from blktx.executor import NullJournal
from blktx.plugins import load

LOG: list[tuple[Any, ...]] = []


class Recorder(ActionType):
    """Records every callback; fails where told."""

    name = "rec.step"
    params = (
        Param("key", "str", required=True),
        Param("fail", "str", default=""),
        Param("fail_cancel", "bool", default=False),
        Param("signal", "str", default=""),
        Param("sleep", "float", default=0.0),
    )

    def target(self, action: Action) -> str:
        return "rec:" + action.params["key"]

    def _log(self, step: str, action: Action) -> None:
        LOG.append((step, action.index, threading.current_thread().name))
        if action.params["fail"] == step:
            raise RuntimeError(f"backend says no in {step}")

    def check(self, action: Action, ctx: Any) -> None:
        self._log("check", action)

    def do(self, action: Action, ctx: Any) -> None:
        self._log("do", action)
        time.sleep(action.params["sleep"])
        if action.params["signal"]:
            os.kill(os.getpid(), signal.Signals[action.params["signal"]])

    def invalidate(self, action: Action, ctx: Any) -> None:
        self._log("invalidate", action)

    def cancel(self, action: Action, ctx: Any) -> None:
        LOG.append(("cancel", action.index, threading.current_thread().name))
        if action.params["fail_cancel"]:
            raise RuntimeError("cancel refused")


class Final(Recorder):
    """A finalize type."""

    name = "rec.final"
    finalize = True
    shares_target = True


class Journal(NullJournal):
    def intent(self, txid: str, phase: str, actions: Any) -> None:
        LOG.append(("journal-intent", phase, tuple(a.index for a in actions)))

    def state(self, txid: str, state: Any, detail: dict[str, Any]) -> None:
        LOG.append(("journal-outcome", str(state)))


class Quiescer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    @hookimpl
    def blktx_quiesce(self, ctx: Any, actions: Any) -> list[Hold]:
        LOG.append(("quiesce",))
        if self.fail:
            raise RuntimeError("guest agent not answering")
        holds = [Hold("test.pause", "vm0")]
        ctx.holding(holds)
        return holds

    @hookimpl
    def blktx_resume(self, hold: Hold) -> bool | None:
        if hold.kind != "test.pause":
            return None
        LOG.append(("resume", hold.target))
        return True


class Early(Recorder):
    """do only prepares: with a quiesce mode it runs before the window."""

    name = "rec.early"
    do_before_quiesce = True


class Types:
    @hookimpl
    def blktx_register_action_types(self, register: Any) -> None:
        register(Recorder)
        register(Early)
        register(Final)


def run(specs: list[tuple[str, dict[str, Any]]], extra: list[Any] = (), **options: Any):
    LOG.clear()
    registry = load(extra=[("rec", Types()), *[(f"x{i}", p) for i, p in enumerate(extra)]])
    tx = Transaction([ActionSpec(t, p) for t, p in specs], options=options, base_dir="/tmp")
    return Executor(registry, journal=Journal()).run(tx)


def steps(name: str) -> list[int]:
    return [e[1] for e in LOG if e[0] == name]


def test_lockstep_order_and_commit_point_before_finalize() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.final", {"key": "b"}), ("rec.step", {"key": "c"})])
    assert result.outcome == "committed" and result.exit_status == 0
    names = [e[0] for e in LOG]
    assert names == [
        "check",
        "check",
        "check",
        "journal-intent",
        "do",
        "do",
        "journal-intent",
        "invalidate",
        "invalidate",
        "journal-outcome",
        "journal-intent",
        "do",
        "invalidate",
        "journal-outcome",
    ]
    assert LOG[3] == ("journal-intent", "do", (0, 2))
    assert LOG[9] == ("journal-outcome", "COMMITTED")
    assert LOG[11][:2] == ("do", 1)


def test_check_refusals_are_all_reported_and_nothing_runs() -> None:
    result = run([("rec.step", {"key": "a", "fail": "check"}), ("rec.step", {"key": "b", "fail": "check"})])
    assert result.outcome == "invalid" and result.exit_status == 2
    assert [p.action for p in result.problems] == [0, 1]
    assert "backend says no in check" in result.problems[0].message
    assert steps("do") == []


def test_two_actions_on_one_target_conflict() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "a"})])
    assert result.outcome == "invalid"
    assert "conflicts with action #0" in result.problems[0].message and result.problems[0].action == 1


def test_failure_in_invalidate_cancels_everything_in_reverse() -> None:
    result = run(
        [
            ("rec.step", {"key": "a"}),
            ("rec.step", {"key": "b"}),
            ("rec.step", {"key": "c", "fail": "invalidate"}),
            ("rec.final", {"key": "d"}),
        ]
    )
    assert result.outcome == "rolled back" and result.exit_status == 1
    assert steps("cancel") == [2, 1, 0]
    assert steps("do") == [0, 1, 2], "the finalize action never ran"
    assert result.failure is not None and (result.failure.action, result.failure.phase) == (2, "invalidate")
    assert "backend says no in invalidate" in result.failure.message
    assert [a.state for a in result.actions] == ["CANCELED", "CANCELED", "CANCELED", "START"]
    assert ("journal-outcome", "ABORTED") in LOG


def test_failure_in_do_stops_the_phase_and_never_touches_later_actions() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "b", "fail": "do"}), ("rec.step", {"key": "c"})])
    assert result.outcome == "rolled back"
    assert steps("do") == [0, 1]
    assert steps("cancel") == [1, 0]


def test_a_failed_cancel_is_reported_with_what_was_left() -> None:
    result = run([("rec.step", {"key": "a", "fail_cancel": True}), ("rec.step", {"key": "b", "fail": "do"})])
    assert result.outcome == "needs recovery" and result.exit_status == 3 and not result.committed
    assert [str(lo) for lo in result.leftovers] == ["rec:a: whatever rec.step action #0 made [cancel refused]"]
    assert result.actions[0].state == "CANCEL_FAILED"
    assert steps("cancel") == [1, 0, 0], "a failed cancel is retried once"
    assert "run `blktx recover`" in result.summary()


def test_failed_finalize_is_retried_then_pending() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.final", {"key": "b", "fail": "do"})], finalize_retries=2, retry_delay=0.0)
    assert result.outcome == "needs recovery" and result.committed and result.exit_status == 3
    assert steps("do") == [0, 1, 1, 1]
    assert [p.action for p in result.pending] == [1]
    assert steps("cancel") == [], "nothing rolls back after the commit point"


@pytest.mark.parametrize("fail", ["", "do", "invalidate"])
def test_quiesced_targets_are_resumed_in_every_outcome(fail: str) -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "b", "fail": fail})], extra=[Quiescer()], quiesce="pause")
    names = [e[0] for e in LOG]
    assert names.count("quiesce") == 1 and names.count("resume") == 1
    assert names.index("quiesce") < names.index("do")
    if fail:
        assert names.index("resume") > max(i for i, n in enumerate(names) if n == "cancel")
    else:
        # the window ends when the last step has returned, before the commit point is written
        assert names.index("resume") < names.index("journal-outcome")
    assert result.holds[0].window is not None and result.holds[0].window >= 0


def test_a_do_that_only_prepares_runs_before_the_window() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.early", {"key": "b"})], extra=[Quiescer()], quiesce="pause")
    assert result.outcome == "committed"
    order = [
        (e[0], e[1]) if e[0] in ("do", "invalidate") else e if e[0].startswith("journal") else (e[0],)
        for e in LOG
        if e[0] != "check"
    ]
    # b's do before the quiesce, a's do inside it; every do before any invalidate
    assert order.index(("do", 1)) < order.index(("quiesce",)) < order.index(("do", 0)) < order.index(("invalidate", 0))
    assert order.index(("journal-intent", "do", (0, 1))) < order.index(("do", 1))
    assert order.index(("invalidate", 0)) < order.index(("resume",)) < order.index(("journal-outcome", "COMMITTED"))


def test_a_failure_before_the_window_never_quiesces() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.early", {"key": "b", "fail": "do"})], extra=[Quiescer()], quiesce="pause")
    assert result.outcome == "rolled back" and result.failure.phase == "do"
    assert ("quiesce",) not in LOG and steps("do") == [1] and steps("cancel") == [1]


def test_without_quiesce_every_do_runs_in_order() -> None:
    run([("rec.step", {"key": "a"}), ("rec.early", {"key": "b"})])
    assert steps("do") == [0, 1]


def test_quiesce_failure_rolls_back_before_any_do() -> None:
    # pluggy calls the plugin registered last first: the one that pauses, then the one that fails
    result = run([("rec.step", {"key": "a"})], extra=[Quiescer(fail=True), Quiescer()], quiesce="pause")
    assert result.outcome == "rolled back" and result.failure.phase == "quiesce"
    assert steps("do") == []
    assert [e for e in LOG if e[0] == "resume"] == [("resume", "vm0")]


def test_no_quiesce_unless_asked() -> None:
    run([("rec.step", {"key": "a"})], extra=[Quiescer()])
    assert ("quiesce",) not in LOG


@pytest.fixture
def sigint_default() -> Any:
    """SIGINT as in a terminal (a background job starts with it ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_before_commit_rolls_back(sigint_default: None, signame: str) -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "b", "signal": signame}), ("rec.step", {"key": "c"})])
    assert result.outcome == "rolled back"
    assert result.failure.phase == "interrupt" and signame in result.failure.message
    assert steps("do") == [0, 1] and steps("cancel") == [1, 0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the caller's handler is back"


def test_an_ignored_sigint_stays_ignored() -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "b", "signal": "SIGINT"})])
        assert result.outcome == "committed"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_jobs_run_steps_in_parallel_threads() -> None:
    result = run([("rec.step", {"key": str(i), "sleep": 0.05}) for i in range(8)], jobs=4)
    assert result.outcome == "committed"
    threads = {e[2] for e in LOG if e[0] == "do"}
    assert len(threads) > 1 and all(t.startswith("blktx") for t in threads)


def test_jobs_rollback_cancels_every_live_action() -> None:
    result = run([("rec.step", {"key": str(i)}) for i in range(6)] + [("rec.step", {"key": "z", "fail": "invalidate"})], jobs=3)
    assert result.outcome == "rolled back"
    assert sorted(steps("cancel")) == list(range(7))


def test_an_illegal_step_is_refused_before_any_side_effect() -> None:
    registry = load(extra=[("rec", Types())])
    executor = Executor(registry)
    action = Action(
        0,
        registry.types["rec.step"].instance,
        {"key": "a", "fail": "", "fail_cancel": False, "signal": "", "sleep": 0.0},
        "rec:a",
    )
    LOG.clear()
    with pytest.raises(RuntimeError, match="invalidate is not allowed from START"):
        executor.step("invalidate", [action], RunContext("t", Options(), "/tmp"))
    assert LOG == [] and action.state == "START"


def test_result_json_has_every_action() -> None:
    result = run([("rec.step", {"key": "a"}), ("rec.step", {"key": "b", "fail": "do"})])
    data = result.to_json()
    assert data["outcome"] == "rolled back" and data["exit_status"] == 1
    assert [a["state"] for a in data["actions"]] == ["CANCELED", "CANCELED"]
    assert data["actions"][1]["error"] == "backend says no in do" and data["actions"][1]["failed_phase"] == "do"
    assert set(data["actions"][0]["durations"]) == {"do", "cancel"}


class BrokenJournal(Journal):
    """Fails its first write after the do phase, like a full disk."""

    def done(self, txid: str, phase: str, actions: Any) -> None:
        if phase == "do":
            raise OSError(28, "No space left on device")


def test_a_journal_failure_before_commit_rolls_back() -> None:
    LOG.clear()
    registry = load(extra=[("rec", Types())])
    tx = Transaction([ActionSpec("rec.step", {"key": "a"}), ActionSpec("rec.step", {"key": "b"})], base_dir="/tmp")
    result = Executor(registry, journal=BrokenJournal()).run(tx)
    assert result.outcome == "rolled back"
    assert result.failure is not None and "No space left on device" in result.failure.message
    assert steps("cancel") == [1, 0]


def test_cli_reports_an_unusable_journal_without_a_traceback(tmp_path: Any, capsys: Any) -> None:
    from blktx.cli import main

    spec = tmp_path / "t.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    (tmp_path / "dir").mkdir()
    status = main(["run", str(spec), "--journal", str(tmp_path / "dir")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"blktx run: refusing the journal {tmp_path / 'dir'}: {tmp_path / 'dir'} is not a regular file" in err
    assert "keep it in a folder only you can write" in err
