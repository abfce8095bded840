"""blktx.plain: output off a terminal is what rich prints there, without rich."""

from __future__ import annotations

import io
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console as RichConsole
from rich.markup import escape as rich_escape
from rich.table import Table as RichTable

from blktx import plain
from blktx.report import LOG_WIDTH, console

#: Text as names and messages hold it: brackets and backslashes (markup), wide and
#: combining characters, tabs and newlines; other control characters are tested apart.
_CHARS = st.sampled_from(list("ab/[]\\=#@ \t\nxé漢😀\u0301"))
#: Not the characters blktx shows escaped on purpose (control, line and bidi characters).
TEXT = st.text(alphabet=_CHARS | st.characters(max_codepoint=0x2FFF, exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf")))
CELL = TEXT.map(lambda s: s.replace("\t", " ").replace("\n", " "))


def _rich(draw: object) -> str:
    out = io.StringIO()
    draw(RichConsole(file=out, highlight=False, emoji=False, width=LOG_WIDTH, soft_wrap=True), RichTable)  # type: ignore[operator]
    return out.getvalue()


def _plain(draw: object) -> str:
    out = io.StringIO()
    draw(plain.Console(out), plain.Table)  # type: ignore[operator]
    return out.getvalue()


@given(TEXT)
def test_escape_is_riches(text: str) -> None:
    assert plain.escape(text) == rich_escape(text)


@given(TEXT, TEXT)
def test_markup_prints_as_rich_prints_it(a: str, b: str) -> None:
    def draw(out, _table):  # type: ignore[no-untyped-def]
        out.print(f"[red]error[/red]: {plain.escape(a)} [bold green]{plain.escape(b)}[/]")
        out.print(a, markup=False)
        out.print(a + "\\[x" + b)  # a backslash before a bracket that is no tag

    assert _plain(draw) == _rich(draw)


@given(st.lists(st.sampled_from(["#", "type", "target", "state", "time", "error"]), min_size=1, max_size=6), st.data())
def test_tables_print_as_rich_prints_them(headers: list[str], data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.lists(CELL, min_size=len(headers), max_size=len(headers)), max_size=4))

    def draw(out, table):  # type: ignore[no-untyped-def]
        t = table(show_edge=False, pad_edge=False)
        for h in headers:
            t.add_column(h, overflow="fold", no_wrap=h in ("#", "state"))
        for row in rows:
            t.add_row(*(plain.escape(c) for c in row))
        out.print(t)

    assert _plain(draw) == _rich(draw)


def test_a_control_character_cannot_forge_a_record_or_drive_a_terminal() -> None:
    out = io.StringIO()
    t = plain.Table()
    for h in ("#", "target"):
        t.add_column(h)
    t.add_row("0", plain.escape("img\nerror: forged\x1b[2J\r"))
    plain.Console(out).print(t)
    plain.Console(out).print("left behind: a\x1b]0;title\x07b\rc", markup=False)
    lines = out.getvalue().splitlines()
    assert lines[2] == "0 │ img\\nerror: forged\\x1b[2J\\r"
    assert lines[3] == "left behind: a\\x1b]0;title\\x07b\\rc"
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    out = io.StringIO()
    plain.Console(out).print("a\x9b2Jb")  # C1: an 8-bit CSI
    assert out.getvalue() == "a\\x9b2Jb\n"


def test_console_is_plain_off_a_terminal_and_rich_when_columns_ask_for_folding(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("COLUMNS", raising=False)
    assert isinstance(console(io.StringIO()), plain.Console)
    monkeypatch.setenv("COLUMNS", "80")
    assert isinstance(console(io.StringIO()), RichConsole)


def test_a_check_in_a_log_does_not_import_rich(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "one.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    code = (
        "import sys; sys.argv = ['blktx', 'check', sys.argv[1]]\n"
        "from blktx.cli import main\n"
        "status = main()\n"
        "print('RICH' if any(m == 'rich' or m.startswith('rich.') for m in sys.modules) else 'NO-RICH')\n"
        "print('METADATA' if 'importlib.metadata' in sys.modules else 'NO-METADATA')\n"
        "sys.exit(status)"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert "check passed" in out.stdout
    assert out.stdout.splitlines()[-2:] == ["NO-RICH", "NO-METADATA"]


def test_an_error_with_a_newline_is_one_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from blktx.errors import Problem
    from blktx.report import print_result
    from blktx.result import Result
    from blktx.states import TxState

    out = io.StringIO()
    problem = Problem("qemu-img: Could not open\nerror: forged record", file="spec.toml", line=3)
    print_result(Result("t", TxState.INVALID, problems=[problem]), plain.Console(out))
    first, *rest = out.getvalue().splitlines()
    assert first.startswith("error: spec.toml:3") and first.endswith("Could not open\\nerror: forged record")
    assert not any(line.startswith("error:") for line in rest)


def test_a_hostile_message_is_one_record_in_run_show_and_recover(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A guest or backend message with a newline, an escape, a carriage return or a
    U+2028 stays inside its record in every command that prints it (helper review)."""
    import json as _json

    hostile = "boom\\nerror: FORGED record\\r\\u001b[2J\\u2028error: FORGED too"  # TOML escapes
    spec = tmp_path / "f.toml"
    spec.write_text(f'version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n[[action]]\ntype = "fault"\nmessage = "{hostile}"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BLKTX_LOCK_DIR": str(tmp_path / "locks")}
    journal = str(tmp_path / "j.sqlite")

    def blktx(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "blktx", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        for text in (out.stdout, out.stderr):
            assert "\x1b" not in text and "\r" not in text and "\u2028" not in text, text
            assert not any(line.startswith("error: FORGED") for line in text.splitlines()), text
        return out.stdout

    ran = blktx("run", "--journal", journal, str(spec))
    assert "FORGED record" in ran and ran.splitlines()[-1].startswith("rolled back:")
    txid = _json.loads(blktx("log", "--json", "--journal", journal))["transactions"][0]["txid"]
    shown = blktx("show", "--journal", journal, txid)
    (failure,) = [line for line in shown.splitlines() if line.startswith("failure:")]
    assert failure.endswith("boom\\nerror: FORGED record\\r\\x1b[2J\\u2028error: FORGED too")
    blktx("recover", "--journal", journal)
