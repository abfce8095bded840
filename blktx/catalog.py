"""Group snapshots: what a committed transaction made, recorded in the same durable
write as its commit, and read back by ``blktx list``.

A spec names its group snapshot with two top-level keys::

    group = "web"                           # which set it belongs to (default: the spec's file name)
    snapshot = "nightly-{now:%Y%m%d-%H%M}"  # its name (default: the transaction id)

Templates: ``{now:FORMAT}`` (``time.strftime``, local time), ``{host}``,
``{group}``, ``{txid}``. The expanded name is used by every action that takes a
snapshot ``name`` and was given none, and checked like any name. Each member is
recorded with its type, target, parameters and the identity its plugin journaled
(``action.undo``: snapshot id and date, overlay inode, subvolume UUID), so that it
can be found again by identity, not by name.
"""

from __future__ import annotations

import os
import re
import socket
import string
import time
from dataclasses import dataclass
from typing import Any

from blktx.actiontype import Action

_FIELDS = {"now", "host", "group", "txid"}
#: A group or snapshot name as stored: printable, no path separators, no spaces at the ends.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,127}$")


def expand(template: str, *, group: str, txid: str, now: float | None = None) -> str:
    """The snapshot name from its template; ValueError saying what is wrong."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.append(literal)
        if field is None:
            continue
        if field not in _FIELDS or conversion:
            raise ValueError(f"unknown field {{{field}}} (known: {', '.join(sorted(_FIELDS))})")
        if field == "now":
            parts.append(time.strftime(spec or "%Y%m%d-%H%M%S", time.localtime(now)))
        elif spec:
            raise ValueError(f"{{{field}}} takes no format")
        else:
            parts.append({"host": socket.gethostname(), "group": group, "txid": txid}[field])
    name = "".join(parts)
    why = check_name(name, "the expanded name")
    if why:
        raise ValueError(why)
    return name


def check_name(name: str, what: str) -> str | None:
    """Why ``name`` cannot be a group or snapshot name, or None."""
    return (
        None
        if _NAME.match(name)
        else (f"{what} {name!r} is not a usable name: letters, digits and _ . : @ + = - only, at most 128")
    )


def default_group(spec_file: str | None) -> str:
    """The group of a spec that names none: its file's name, made usable (``my spec.toml``
    -> ``my-spec``), else ``default``."""
    if not spec_file or spec_file == "<stdin>":
        return "default"
    stem = re.sub(r"[^A-Za-z0-9_.:@+=-]+", "-", os.path.splitext(os.path.basename(spec_file))[0]).strip("-._")
    return stem[:128] if _NAME.match(stem[:128] or "-") else "default"


@dataclass(frozen=True)
class Naming:
    """The group snapshot a transaction makes: its group and expanded name."""

    group: str
    name: str


def members(actions: list[Action]) -> list[dict[str, Any]]:
    """What the catalog keeps of each action that made something: enough to find it
    again by identity (the plugin's journaled undo facts) and to revert or delete it."""
    return [
        {"index": a.index, "type": a.type.name, "target": a.target, "params": a.params, "identity": a.undo}
        for a in actions
        if not a.type.finalize
    ]


def verify(entry: dict[str, Any], registry: Any) -> list[dict[str, Any]]:
    """Each member of a group snapshot with ``present``: True, False, or None when its
    type cannot tell (:meth:`~blktx.ActionType.member_exists` not implemented)."""
    out = []
    for m in entry["members"]:
        atype = registry.get(m["type"])
        present: bool | None = None
        why = ""
        if atype is None:
            why = f"the plugin of {m['type']} is not installed"
        else:
            action = Action(m["index"], atype, m["params"], m["target"])
            action.undo = dict(m["identity"] or {})
            try:
                present = atype.member_exists(action)
            except Exception as exc:  # noqa: BLE001 - a member that cannot be looked at is not known present
                present, why = False, f"{type(exc).__name__}: {exc}"
        out.append({**m, "present": present, **({"why": why} if why else {})})
    return out
