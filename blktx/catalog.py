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
import string
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blktx.actiontype import Action
from blktx.errors import BlktxError, InvalidTransaction, Problem

if TYPE_CHECKING:
    from blktx.spec import Transaction

_FIELDS = {"now", "host", "group", "txid"}


def clock() -> float:
    """Now, for name templates and the catalog's times (tests replace it: a fake clock)."""
    return time.time()


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
            parts.append(time.strftime(spec or "%Y%m%d-%H%M%S", time.localtime(clock() if now is None else now)))
        elif spec:
            raise ValueError(f"{{{field}}} takes no format")
        else:
            parts.append({"host": os.uname().nodename, "group": group, "txid": txid}[field])
    name = "".join(parts)
    why = check_name(name, "the expanded name")
    if why:
        raise ValueError(why)
    return name


def check_name(name: str, what: str) -> str | None:
    """Why ``name`` cannot be a group or snapshot name, or None. A group's name has no
    ``@``: commands name a group snapshot ``GROUP@NAME``."""
    group = what.startswith("group")
    if _NAME.fullmatch(name) and not (group and "@" in name):
        return None
    allowed = "_ . : + = -" if group else "_ . : @ + = -"
    return f"{what} {name!r} is not a usable name: letters, digits and {allowed} only, at most 128"


def default_group(spec_file: str | None) -> str:
    """The group of a spec that names none: its file's name, made usable (``my spec.toml``
    -> ``my-spec``), else ``default``."""
    if not spec_file or spec_file == "<stdin>":
        return "default"
    stem = re.sub(r"[^A-Za-z0-9_.:+=-]+", "-", os.path.splitext(os.path.basename(spec_file))[0]).strip("-._")
    return stem[:128] if _NAME.match(stem[:128] or "-") else "default"


@dataclass(frozen=True)
class Naming:
    """The group snapshot a transaction makes: its group and expanded name."""

    group: str
    name: str


def group_problem(journal: Any, options: Any, file: str | None, base_dir: str) -> str | None:
    """Why this run may not add to its group: the group was only the spec file's name,
    and another spec file's runs made group snapshots of it (two ``nightly.toml`` in two
    folders would share one retention and prune each other's)."""
    files = getattr(journal, "group_files", None)
    if not options.group_defaulted or files is None or not file or file == "<stdin>":
        return None
    mine = os.path.join(base_dir, os.path.basename(file))
    others = sorted(f for f in files(options.group) if f != mine)
    if not others:
        return None
    return f"the group {options.group!r} (this spec's file name) already holds group snapshots made by {others[0]}"


def members(actions: list[Action]) -> list[dict[str, Any]]:
    """What the catalog keeps of each action that made something: enough to find it
    again by identity (the plugin's journaled undo facts) and to revert or delete it."""
    return [m for m in (a.type.catalog_member(a) for a in actions if not a.type.finalize) if m is not None]


def commit_change(journal: Any, txid: str, options: Any, actions: list[Action], made: bool) -> None:
    """Inside the commit write: record the group snapshot this run made, remove the ones
    it deletes (a delete whose group snapshot is already gone must not commit)."""
    record, forget = getattr(journal, "catalog", None), getattr(journal, "uncatalog", None)
    kept = members(actions) if options.group and made else []
    if record is not None and kept:
        record(txid, options.group, options.snapshot, kept, clock())
    if options.forgets:
        if forget is None:
            raise BlktxError("deleting a group snapshot needs the journal that records it")
        forget(options.forgets)


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


def label(entry: dict[str, Any]) -> str:
    """``group@name``: how commands and messages name a group snapshot."""
    return f"{entry['group']}@{entry['name']}"


def plan(
    entries: list[dict[str, Any]],
    purpose: str,
    registry: Any,
    *,
    missing_ok: bool = False,
    keep_current: bool = False,
    discard_current: bool = False,
) -> Transaction:
    """The transaction that reverts (``purpose="revert"``, one entry) or deletes
    (``"delete"``, any number: one all-or-none transaction) group snapshots, each
    member by its type's ``revert_type``/``delete_type``, from its identity.

    Every member is verified first: one that is gone refuses the whole plan (a delete
    with ``missing_ok`` skips it), naming the group snapshot, member and target.
    Raises :class:`InvalidTransaction` listing every problem. Touches nothing.
    """
    from blktx.spec import ActionSpec, Transaction

    problems: list[Problem] = []
    specs: list[ActionSpec] = []
    for entry in entries:
        where = label(entry)
        for m in verify(entry, registry):
            atype = registry.get(m["type"])

            def refuse(message: str, hint: str | None = None, m: dict[str, Any] = m, where: str = where) -> None:
                problems.append(
                    Problem(
                        f"member #{m['index']} ({m['type']}): {message}", where, action=m["index"], target=m["target"], hint=hint
                    )
                )

            if atype is None:
                refuse(m["why"], hint=f"install the plugin that provides {m['type']}")
                continue
            kind = atype.revert_type if purpose == "revert" else atype.delete_type
            if not kind or registry.get(kind) is None:
                why = atype.no_revert if purpose == "revert" and not kind else ""
                refuse(why or f"{m['type']} declares no {purpose}" + (f" ({kind} is not installed)" if kind else ""))
                continue
            if m["present"] is False:
                if purpose == "delete" and missing_ok:
                    continue
                refuse(
                    "is gone" + (f" ({m['why']})" if m.get("why") else "") + f": {where} is incomplete",
                    hint="`blktx delete --missing-ok` removes the members that are left"
                    if purpose == "delete"
                    else "an incomplete group snapshot cannot be reverted: `blktx list --verify` shows what is left",
                )
                continue
            action = Action(m["index"], atype, dict(m["params"]), m["target"])
            action.undo = dict(m["identity"] or {})
            try:
                params = atype.revert_params(action) if purpose == "revert" else atype.delete_params(action)
            except Exception as exc:  # noqa: BLE001 - the plugin's own words
                refuse(f"cannot plan the {purpose}: {exc}")
                continue
            for flag, on in (("keep_current", keep_current), ("discard_current", discard_current)):
                if on and registry.get(kind).param(flag) is not None:  # a revert type that offers the choice
                    params[flag] = True
            specs.append(ActionSpec(kind, params))
    if problems:
        raise InvalidTransaction(problems)
    names = ", ".join(label(e) for e in entries)
    file = label(entries[0]) if len(entries) == 1 else f"{len(entries)} group snapshots"
    return Transaction(specs, file=file, base_dir="/", description=f"{purpose} {names}")
