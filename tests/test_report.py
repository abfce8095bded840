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
    assert "sim:noop/a" in text and "CANCELED" in text and "boom" in text
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
