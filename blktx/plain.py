"""Output for logs: what ``rich`` prints when nothing is a terminal, without importing it.

A run from a timer, cron or a pipe prints to a file, journald or mail. There rich
draws no colour and folds nothing (``report.LOG_WIDTH``), so its output is plain
text that this module writes directly, byte for byte the same (tests compare the
two on generated tables and messages), and the ~30 ms of importing and measuring
with rich are not paid by every run. On a terminal, or when ``$COLUMNS`` asks for
folding, :func:`blktx.report.console` still returns a rich ``Console``.

Only what blktx's printers use is here: ``print`` of console markup or plain
text, and tables of text cells with the default heavy-head box, no edge.

Where the two differ, on purpose: a control character that would let a hostile
name forge a record or drive the terminal of whoever reads the log (an escape, a
carriage return, ...) is shown as ``\\x1b``, ``\\r``, ...; a table cell is one line
(a newline or tab in it is shown as ``\\n``, ``\\t``), so a table row is one record.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

#: Console markup tags, as rich finds them (``rich.markup.RE_TAGS``).
_TAGS = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
#: Control characters are shown, not sent: ``\\x1b`` for an escape, ``\\n`` in a cell;
#: so are the characters that end a line for some readers (U+2028, U+2029) or reorder
#: what a terminal shows (the bidirectional controls).
_SHOWN = (
    {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
    | {c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
    | {9: "\\t", 10: "\\n", 13: "\\r"}
)
_IN_TEXT = {c: v for c, v in _SHOWN.items() if c not in (9, 10)}


def escape(markup: str) -> str:
    """``rich.markup.escape``: text that prints as itself where markup is read."""
    markup = _ESCAPE.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", markup)
    if markup.endswith("\\") and not markup.endswith("\\\\"):
        return markup + "\\"
    return markup


def shown(text: str) -> str:
    """``text`` (a name, a message: anything a backend, a guest or a spec wrote) as one
    line with every control character shown (``\\n``, ``\\x1b``): one record, on a
    terminal and in a log alike, that drives no terminal."""
    return text.translate(_SHOWN)


def record(text: str) -> str:
    """:func:`shown`, escaped for console markup."""
    return escape(shown(text))


def lines(text: str) -> str:
    """Many lines of output (a command's): newlines and tabs kept, every other control
    character shown."""
    return text.translate(_IN_TEXT)


def render(markup: str) -> str:
    """The text of console markup: tags dropped, escaped brackets and backslashes kept."""
    if "[" not in markup:
        return markup
    out: list[str] = []
    position = 0
    for match in _TAGS.finditer(markup):
        full, escapes, _ = match.groups()
        start, end = match.span()
        out.append(markup[position:start].replace("\\[", "["))  # as rich: "\\[" not before a tag
        position = end
        if escapes:
            backslashes, escaped = divmod(len(escapes), 2)
            out.append("\\" * backslashes)
            if escaped:
                out.append(full[len(escapes) :])
    out.append(markup[position:].replace("\\[", "["))
    return "".join(out)


def _expand_tabs(line: str) -> str:
    """Tabs to the next multiple of 8 cells, counted as rich counts them."""
    if "\t" not in line:
        return line
    out: list[str] = []
    column = 0
    for i, part in enumerate(line.split("\t")):
        if i:
            pad = 8 - column % 8
            out.append(" " * pad)
            column += pad
        out.append(part)
        column += _width(part)
    return "".join(out)


def _text(value: str, markup: bool) -> str:
    text = (render(value) if markup else value).translate(_IN_TEXT)
    return "\n".join(_expand_tabs(line) for line in text.split("\n"))


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    from rich.cells import cell_len  # wide and zero-width characters, measured as rich does

    return cell_len(text)


class Table:
    """The part of ``rich.table.Table`` blktx uses, printed unfolded: the default box
    (``HEAVY_HEAD``) with ``show_edge=False, pad_edge=False``."""

    def __init__(self, **_: Any) -> None:
        self.columns: list[str] = []
        self.rows: list[list[str]] = []

    def add_column(self, header: str, **_: Any) -> None:
        self.columns.append(header)

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def lines(self) -> list[str]:
        grid = [[render(c).translate(_SHOWN) for c in row] for row in [self.columns, *self.rows]]
        widths = [max(_width(row[i]) for row in grid) for i in range(len(self.columns))]
        last = len(widths) - 1

        def cell(i: int, text: str) -> str:
            padded = text + " " * (widths[i] - _width(text))
            return (" " if i else "") + padded + (" " if i < last else "")

        out: list[str] = []
        for r, row in enumerate(grid):
            out.append(("┃" if r == 0 else "│").join(cell(i, c) for i, c in enumerate(row)))
            if r == 0:
                out.append("╇".join("━" * (w + (1 if i else 0) + (1 if i < last else 0)) for i, w in enumerate(widths)))
        return out


class Console:
    """A console for output that is not a terminal: ``print`` writes whole lines."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def print(self, value: object = "", *, markup: bool = True, highlight: bool = False) -> None:
        del highlight  # nothing is highlighted off a terminal
        if isinstance(value, Table):
            text = "\n".join(value.lines()) if value.columns else ""
        else:
            text = _text(str(value), markup)
        self.file.write(text + "\n")
        self.file.flush()  # as rich does: a run killed later keeps what it printed
