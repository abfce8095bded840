from __future__ import annotations

import io
import json

from rich.console import Console

from blktx import ActionSpec, Executor, Transaction
from blktx.plugins import default_registry
from blktx.report import print_result, types_json


def render(result) -> str:
    buf = io.StringIO()
    print_result(result, Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


def test_table_shows_every_action_and_the_summary() -> None:
    result = Executor().run(
        Transaction([ActionSpec("sim.noop", {"key": "a"}), ActionSpec("fault", {"message": "boom"})], base_dir="/tmp")
    )
    text = render(result)
    assert "sim:noop/a" in text and "undone" in text and "boom" in text
    assert text.strip().splitlines()[-1] == "rolled back: action #1 (fault) on fault:#1 failed in do: boom; nothing changed"
    assert json.loads(json.dumps(result.to_json()))["failure"]["message"] == "boom"


def test_long_runs_are_cut_with_a_pointer_to_json() -> None:
    result = Executor().run(Transaction([ActionSpec("sim.noop", {"key": str(i)}) for i in range(250)], base_dir="/tmp"))
    text = render(result)
    assert "... and 50 more actions (use --json for all)" in text and len(result.to_json()["actions"]) == 250


def test_types_json_names_the_plugin() -> None:
    info = {t["name"]: t for t in types_json(default_registry())}
    assert info["qcow2.internal-delete"]["plugin"] == "qcow2" and info["qcow2.internal-delete"]["finalize"]


def test_text_from_specs_and_backends_is_printed_as_is_not_as_markup(tmp_path) -> None:
    """A target is shown as [target], and a backend's message may hold [brackets]:
    rich must not take either for a style tag and drop it."""
    result = Executor().run(
        Transaction([ActionSpec("qcow2.internal-create", {"image": "[red]x.qcow2", "name": "n"})], base_dir=str(tmp_path))
    )
    text = render(result)
    assert result.outcome == "invalid"
    assert f"action #0 [{tmp_path}/[red]x.qcow2] {tmp_path}/[red]x.qcow2 does not exist" in text
    failed = Executor().run(Transaction([ActionSpec("fault", {"message": "[bold]device[/bold] [busy]"})], base_dir="/tmp"))
    assert "[bold]device[/bold] [busy]" in render(failed)


def test_emoji_codes_in_names_are_printed_as_written() -> None:
    """`:x:` in a snapshot or exec target name is text: an operator copies it back."""
    from blktx.report import console

    failed = Executor().run(Transaction([ActionSpec("fault", {"message": "pre:x:084754 and :smile:"})], base_dir="/tmp"))
    buf = io.StringIO()
    print_result(failed, console(buf))
    assert "pre:x:084754 and :smile:" in buf.getvalue()


def _streamed(data: object) -> str:
    from blktx.report import print_json

    buf = io.StringIO()
    print_json(data, buf)
    return buf.getvalue()


def _results(tmp_path) -> list:
    """Results with every field of the report filled somewhere: actions with errors,
    durations and output, problems, a failure and failures, leftovers, pending
    finalize steps, holds, a cut, warnings; text that JSON must escape."""
    from blktx.actiontype import Leftover
    from blktx.errors import Problem
    from blktx.events import Hold
    from blktx.result import Failure, Result
    from blktx.states import TxState

    committed = Executor().run(
        Transaction([ActionSpec("sim.noop", {"key": f"k{i}"}) for i in range(3)], base_dir="/tmp", description="three\nlines é")
    )
    rolled_back = Executor().run(
        Transaction(
            [ActionSpec("sim.noop", {"key": "a"}), ActionSpec("fault", {"phase": "invalidate", "message": 'quote " and \\ [x]'})],
            base_dir="/tmp",
        )
    )
    invalid = Executor().run(
        Transaction([ActionSpec("qcow2.internal-create", {"image": "missing.qcow2", "name": "n"})], base_dir=str(tmp_path))
    )
    failure = Failure("cancel", "refused\nby the backend", action=1, type="sim.snapshot", target="sim:vda")
    left = Result(
        "tx-1",
        TxState.ROLLBACK_INCOMPLETE,
        actions=rolled_back.actions,
        problems=[Problem("odd ☃", file="s.toml", line=3, hint="look")],
        failure=failure,
        failures=[failure, Failure("do", "first")],
        leftovers=[Leftover("sim:vda", "a snapshot", why="cancel refused"), Leftover("sim:vdb", "an overlay")],
        pending=[Failure("finalize", "later", action=0, type="sim.delete", target="sim:vdc")],
        holds=[Hold("qmp.pause", "vm1", {"socket": "/run/x"}, start=1.0, end=1.5), Hold("fsfreeze", "vm2")],
        seconds=1.23456789,
        phases={"check": 0.1234567, "do": 2.0},
        warnings=["careful", "twice"],
        cut={"inside": True, "holds": 1, "common_window_ms": 0.5, "members": [{"action": 0, "inside": True}]},
    )
    empty = Result("-", TxState.INVALID, problems=[Problem("no actions")])
    return [committed, rolled_back, invalid, left, empty]


def test_the_streamed_json_report_is_the_report_byte_for_byte(tmp_path) -> None:
    """`--json` writes a result field by field and action by action (a 100,000-action
    report is never one dict or one string), and prints exactly what
    ``json.dumps(result.to_json(), indent=2)`` would."""
    results = _results(tmp_path)
    assert {r.outcome for r in results} >= {"committed", "rolled back", "invalid", "needs recovery"}
    for result in results:
        text = _streamed(result)
        assert text == json.dumps(result.to_json(), indent=2, default=str) + "\n"
        assert json.loads(text) == result.to_json()
    assert not results[-1].actions and '"actions": []\n}' in _streamed(results[-1])


def test_print_json_streams_any_document_as_dumps_would(tmp_path) -> None:
    """Other reports (lists, recover's results, the journal's log) print as before,
    in pieces large enough to keep writes few."""
    docs: list[object] = [
        {"results": [r.to_json() for r in _results(tmp_path)], "journal": "/j"},
        {"transactions": [{"txid": str(i), "path": tmp_path} for i in range(5000)]},
        [],
        {},
        "x",
        None,
    ]
    for doc in docs:
        assert _streamed(doc) == json.dumps(doc, indent=2, default=str) + "\n"


def test_a_large_report_is_written_in_batches_not_whole() -> None:
    from blktx.report import print_json

    result = Executor().run(Transaction([ActionSpec("sim.noop", {"key": str(i)}) for i in range(20_000)], base_dir="/tmp"))

    class Sink(io.StringIO):
        sizes: list[int] = []

        def write(self, s: str) -> int:
            self.sizes.append(len(s))
            return super().write(s)

    sink = Sink()
    print_json(result, sink)
    assert json.loads(sink.getvalue()) == result.to_json()
    assert 1 < len(sink.sizes) < 20 and max(sink.sizes) < len(sink.getvalue()) / 2


def test_a_committed_action_reads_in_effect_not_invalidated() -> None:
    """Issue 17 item 3: people's words in the table; the JSON keeps the machine's state."""
    result = Executor().run(Transaction([ActionSpec("sim.noop", {"key": "a"})], base_dir="/tmp"))
    text = render(result)
    assert "in effect" in text and "INVALIDATED" not in text
    assert result.to_json()["actions"][0]["state"] == "INVALIDATED"
