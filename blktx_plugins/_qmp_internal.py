"""Internal snapshots of running VMs' drives, as ``qmp`` finds and names them:
snapshot lists from QMP replies, snapshot dates as text, which snapshot an
``internal-delete`` means, and the conflicts between actions on one drive that
QEMU's ``transaction`` would refuse or blktx could not tell apart."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from blktx import Action, Refused
from blktx_plugins._image import Snapshot, bare, shown

#: A snapshot's date as the ``date`` parameter takes it: QMP's ``date-sec``, a dot,
#: and ``date-nsec`` as nine digits.
_DATE = re.compile(r"^([0-9]{1,20})\.([0-9]{9})$")


def snapshots_of(image: dict[str, Any]) -> list[Snapshot]:
    """The internal snapshots of a QMP ``ImageInfo`` (``query-block``'s
    ``inserted.image``), each with its id, name and date."""
    return [
        Snapshot(s["id"], s["name"], (int(s.get("date-sec", 0)), int(s.get("date-nsec", 0)))) for s in image.get("snapshots", [])
    ]


def date_text(date: Sequence[int]) -> str:
    """A snapshot's date as the ``date`` parameter takes it: ``"SEC.NSEC"``."""
    return f"{int(date[0])}.{int(date[1]):09d}"


def parse_date(text: str) -> tuple[int, int]:
    """``"SEC.NSEC"`` as (seconds, nanoseconds), or :class:`Refused`."""
    m = _DATE.match(text)
    if not m or int(m.group(2)) >= 1_000_000_000:
        raise Refused(
            f"date {shown(text)} is not a snapshot date",
            hint='give "SEC.NSEC": date-sec, a dot, and date-nsec as nine digits, as query-block reports them '
            '(e.g. "1700000000.012345000")',
        )
    return int(m.group(1)), int(m.group(2))


def same(wanted: Snapshot, found: Snapshot) -> bool:
    """One point in time: id, name and date (an id is reused after a delete); id and
    name only when the date is not known (an older journal)."""
    return wanted.same(found) if wanted.date != (0, 0) else (wanted.id, wanted.name) == (found.id, found.name)


def _listed(snaps: list[Snapshot]) -> str:
    return ", ".join(f"{bare(s.id)}:{shown(s.name)}" for s in snaps) or "none"


def pick(snaps: list[Snapshot], sid: str, name: str, date: str, where: str) -> Snapshot:
    """The one snapshot an ``internal-delete`` means: by id, by name or by both (as
    ``blockdev-snapshot-delete-internal-sync`` takes them), and of that date when
    one is given; :class:`Refused` saying why there is not exactly one."""
    if not sid and not name:
        raise Refused(f"{where}: give the snapshot's id or name (or both)", hint='id = "..." and/or name = "..."')
    when = parse_date(date) if date else None
    if sid:
        found = [s for s in snaps if s.id == sid]
        if not found:
            raise Refused(f"{where} has no snapshot with id {shown(sid)} (it has: {_listed(snaps)})")
        if name and all(s.name != name for s in found):
            named = [bare(s.id) for s in snaps if s.name == name]
            raise Refused(
                f"{where}: id {shown(sid)} and name {shown(name)} disagree: snapshot id {bare(sid)} is named "
                f"{shown(found[0].name)}" + (f", and {shown(name)} has id {', '.join(named)}" if named else ""),
                hint="give the id and the name of one snapshot, or only one of them",
            )
        found = [s for s in found if not name or s.name == name]
    else:
        found = [s for s in snaps if s.name == name]
        if not found:
            raise Refused(f"{where} has no snapshot named {shown(name)} (it has: {_listed(snaps)})")
    if len(found) > 1:
        raise Refused(
            f"{where} has {len(found)} snapshots {'with id ' + shown(sid) if sid else 'named ' + shown(name)} "
            f"(ids {', '.join(bare(s.id) for s in found)})",
            hint='give id = "..." to say which' if not sid else "delete it by hand: blktx cannot tell them apart",
        )
    snap = found[0]
    if when is not None and snap.date != when:
        raise Refused(
            f"{where}: snapshot {shown(snap.name)} (id {bare(snap.id)}) is dated {date_text(snap.date)}, not "
            f"{date}: it is another point in time than the one meant",
            hint="the snapshot of that date is gone; query-block lists what there is",
        )
    return snap


def twice(
    actions: Sequence[Action], key: Callable[[Action], Hashable], why: Callable[[Action, Action], str], hint: str
) -> dict[int, BaseException]:
    """Each action whose ``key`` an earlier one has (both on one target), refused
    with ``why(earlier, action)``, which names both."""
    first: dict[Hashable, Action] = {}
    out: dict[int, BaseException] = {}
    for a in actions:
        other = first.setdefault(key(a), a)
        if other is not a:
            out[a.index] = Refused(why(other, a), hint=hint)
    return out
