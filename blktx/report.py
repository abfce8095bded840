"""Rendering results and registries for people (rich tables on a terminal, plain
text in logs) and for scripts (JSON)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from blktx import plain
from blktx.events import Event
from blktx.hookspecs import hookimpl
from blktx.plain import escape, lines, record, shown
from blktx.plugins import Registry
from blktx.result import COMMITTED, Result, action_json
from blktx.status import action_word


class Console(Protocol):
    """Where people's output goes: a rich ``Console`` on a terminal, else :class:`blktx.plain.Console`."""

    def print(self, value: Any = "", *, markup: bool = True, highlight: bool = False) -> None: ...


_STYLE = {
    "INVALIDATED": "green",
    "CANCELED": "yellow",
    "START": "dim",
    "CREATED": "cyan",
    "DOING": "magenta",
    "CANCEL_FAILED": "bold red",
}


def _state(state: str, shown: str | None = None) -> str:
    """An action's state for a table cell, in people's words (:data:`blktx.status.ACTION_WORDS`),
    coloured when it has a colour; never broken markup."""
    style = _STYLE.get(state)
    text = escape(shown or action_word(state))
    return f"[{style}]{text}[/]" if style else text


#: The width of output that is not a terminal and has no ``$COLUMNS``: wide enough
#: that a record is never folded (a log holds one record per line).
LOG_WIDTH = 100_000


def console(stream: TextIO | None = None) -> Console:
    """A console for people: on a terminal, rich at its width (``$COLUMNS`` when set);
    piped to a file, journald or cron mail, plain lines never folded
    (:mod:`blktx.plain`), or rich folding at ``$COLUMNS`` when that is set."""
    stream = stream or sys.stdout
    width = None
    if not stream.isatty():
        columns = os.environ.get("COLUMNS", "")
        if not (columns.isdigit() and int(columns) > 0):
            return plain.Console(stream)
        width = int(columns)
    from rich.console import Console as Rich

    return Rich(file=stream, highlight=False, emoji=False, width=width)


def table(out: Console) -> Any:
    """A table for ``out``: rich's where rich prints, else a :class:`blktx.plain.Table`."""
    if isinstance(out, plain.Console):
        return plain.Table()
    from rich.table import Table

    return Table(show_edge=False, pad_edge=False)


def _action_table(out: Console) -> Any:
    found = table(out)
    for col in ("#", "type", "target", "state", "time", "error"):
        found.add_column(col, overflow="fold", no_wrap=col in ("#", "type", "state", "time"))
    return found


#: How every JSON document is printed: ``json.dumps(data, indent=2, default=str)``.
_ENCODER = json.JSONEncoder(indent=2, default=str)
#: Pieces of JSON text gathered before one write to the stream.
_BATCH = 4096


def print_json(data: Any, stream: TextIO | None = None) -> None:
    """Print ``data`` as ``json.dumps(data, indent=2, default=str)`` does, and a newline,
    written as it is encoded: the document never exists whole in memory.

    A :class:`Result` is printed as its :meth:`~Result.to_json` would be, byte for
    byte, without building that dict: its fields, then its actions one at a time.
    """
    out = stream or sys.stdout
    pieces = _result_pieces(data) if isinstance(data, Result) else _ENCODER.iterencode(data)
    batch: list[str] = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) >= _BATCH:
            out.write("".join(batch))
            batch.clear()
    batch.append("\n")
    out.write("".join(batch))


def _result_pieces(result: Result) -> Iterator[str]:
    head = _ENCODER.encode(result.json_head())
    # The head ends "\n}": the actions go before that brace, one indent level in
    # (JSON text holds no raw newline but these, so indenting by replace is exact).
    yield head[:-2] + ',\n  "actions": ['
    if not result.actions:
        yield "]\n}"
        return
    separator = "\n    "
    for a in result.actions:
        yield separator + _ENCODER.encode(action_json(a)).replace("\n", "\n    ")
        separator = ",\n    "
    yield "\n  ]\n}"


def print_result(result: Result, out: Console, *, limit: int = 200) -> None:
    if result.problems:
        for p in result.problems:
            out.print(f"[red]error[/red]: {record(str(p))}", markup=True, highlight=False)
    if result.actions and not result.problems:
        rows = _action_table(out)
        for a in result.actions[:limit]:
            took = sum((a.durations or {}).values())
            state = None if not result.checked_only else "checked"
            rows.add_row(
                str(a.index),
                record(a.type.name),
                record(a.target),
                _state(a.state, state),
                f"{took * 1000:.1f} ms" if took else "",
                record(a.error or ""),
            )
        out.print(rows)
        if len(result.actions) > limit:
            out.print(f"... and {len(result.actions) - limit} more actions (use --json for all)")
    for a in result.actions[:limit]:
        if a.output and not result.problems:
            text = a.output.strip()
            text = text if len(text) <= 500 else text[:500] + " … (--json has it all)"
            out.print(f"#{a.index} {a.type.name}: {lines(text)}", markup=False, highlight=False)
    for hold in result.holds:
        window = f"{hold.window * 1000:.1f} ms" if hold.window is not None else "not resumed"
        out.print(f"quiesced {shown(hold.target)} ({shown(hold.kind)}): {window}", markup=False)
    if result.cut is not None:
        out.print(_cut_line(result.cut), markup=False)
    for lo in result.leftovers:
        out.print(f"[red]left behind[/red]: {record(str(lo))}")
    for f in result.pending:
        out.print("[yellow]pending finalize[/yellow]: " + record(f"action #{f.action} ({f.type}) on {f.target}: {f.message}"))
    for w in result.warnings:
        out.print(f"[yellow]warning[/yellow]: {record(w)}")
    colour = "green" if result.outcome == COMMITTED else "red" if result.problems or result.leftovers else "yellow"
    out.print(f"[bold {colour}]{record(result.summary())}[/]")


def types_json(registry: Registry) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "plugin": entry.plugin,
            "summary": entry.cls.summary(),
            "finalize": entry.cls.finalize,
            "shares_target": entry.cls.shares_target,
            "params": [p.to_json() for p in entry.cls.params],
        }
        for name, entry in sorted(registry.types.items())
    ]


def print_shown(tx: dict[str, Any], out: Console) -> None:
    """One transaction from the journal (``blktx show``), in the words ``run`` uses."""
    from blktx.result import Failure

    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(tx["started"])) if tx.get("started") else "-"
    took = f", {tx['seconds']:.3f}s" if tx.get("seconds") is not None else ""
    out.print(f"transaction {tx['txid']}: {tx['outcome']} ({tx['words']}; state {tx['status']})", markup=False)
    out.print(
        shown(f"spec: {tx.get('file') or '(python)'}" + (f" - {tx['description']}" if tx.get("description") else "")),
        markup=False,
    )
    out.print(f"started {started}{took}; {len(tx['actions'])} action(s)", markup=False)
    rows = _action_table(out)
    for a in tx["actions"]:
        ms = sum((a["durations"] or {}).values()) * 1000
        rows.add_row(
            str(a["index"]),
            record(a["type"]),
            record(a["target"]),
            _state(a["state"]),
            f"{ms:.1f} ms" if ms else "",
            record(a["error"] or ""),
        )
    out.print(rows)
    for h in tx["holds"]:
        state = "resumed" if h["resumed"] else "NOT resumed: `blktx recover` resumes it"
        out.print(f"quiesced {shown(h['target'])} ({shown(h['kind'])}): {state}", markup=False)
    detail = tx.get("detail") or {}
    if detail.get("cut"):
        out.print(_cut_line(detail["cut"]), markup=False)
    if detail.get("failure"):
        out.print(f"failure: {shown(str(Failure(**detail['failure'])))}", markup=False)
    for left in detail.get("leftovers") or []:
        out.print(f"[red]left behind[/red]: {record(str(left))}")
    for p in detail.get("pending") or []:
        out.print(f"[yellow]pending finalize[/yellow]: {record(str(Failure(**p)) if isinstance(p, dict) else str(p))}")
    if detail.get("recovered"):
        out.print(f"finished by blktx recover: {shown(str(detail['recovered']))}", markup=False)


def _cut_line(cut: dict[str, Any]) -> str:
    taken = [m for m in cut["members"] if m["inside"] is not None]
    if cut["inside"]:
        return (
            f"point in time: {len(taken)} member(s) taken inside the common window of {cut['holds']} hold(s) "
            f"({cut['common_window_ms']:.1f} ms"
            + (", bounded by the VMs' STOP and RESUME events)" if cut.get("clock") == "qemu" else ")")
        )
    outside = [str(m["action"]) for m in cut["members"] if m["inside"] is False]
    return f"point in time NOT shown: action(s) #{', #'.join(outside)} ran outside the common window"


def print_types(registry: Registry, out: Console) -> None:
    for info in types_json(registry):
        flags = escape(" [finalize]") if info["finalize"] else ""
        out.print(
            f"[bold]{escape(info['name'])}[/bold]{flags}  (plugin {escape(str(info['plugin']))}) - {escape(info['summary'])}"
        )
        for p in info["params"]:
            req = "required" if p["required"] else f"default {p.get('default')!r}"
            choices = f" one of {p['choices']}" if p.get("choices") else ""
            out.print(f"    {p['name']:<14} {p['kind']:<10} {req}{choices}  {p['doc']}", markup=False)


class Progress:
    """A ``blktx_event`` plugin that draws one progress bar per phase on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console as Rich
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(console=Rich(file=stream, emoji=False, highlight=False), transient=True)
        self._task: Any = None
        self._pending = 0
        self._last = 0.0

    @hookimpl
    def blktx_event(self, event: Event) -> None:
        if event.kind == "phase-start":
            if self._task is None:
                self._bar.start()
            self._flush()
            self._task = self._bar.add_task(event.phase, total=event.total)
        elif event.kind == "action" and self._task is not None:
            # One bar update per 50 ms, not per action: 100,000 actions stay fast.
            self._pending += 1
            now = time.monotonic()
            if now - self._last > 0.05:
                self._flush()
                self._last = now
        elif event.kind in ("phase-end", "outcome"):
            self._flush()
            if event.kind == "outcome":
                self._bar.stop()

    def _flush(self) -> None:
        if self._task is not None and self._pending:
            self._bar.advance(self._task, self._pending)
        self._pending = 0
