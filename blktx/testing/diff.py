"""Comparing what ``observe`` returned: a compact diff of two worlds (for failure
messages), and worlds made in two folders written alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class _Present:
    """A member of a list or set of plain values (shown in a diff without a value)."""

    def __repr__(self) -> str:
        return "present"


_PRESENT = _Present()
#: A diff shows at most this many changes, each value at most this many characters.
DIFF_LINES, DIFF_WIDTH = 12, 100


def _normal(value: Any, base: Path | None) -> Any:
    """``value`` with the world's folder written ``{base}`` in every string: worlds
    made in two folders compare, and show, alike."""
    if base is None:
        return value
    if isinstance(value, str):
        return value.replace(str(base), "{base}")
    if isinstance(value, dict):
        return {_normal(k, base): _normal(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_normal(v, base) for v in value)
    return value


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _as_mapping(value: Any) -> dict[Any, Any] | None:
    """``value`` as keys and values when it reads as one: a dict, a list or set of
    ``(key, value)`` pairs with distinct keys (``sorted(dict.items())``), or a list or
    set of distinct plain values (each key then just ``present``). A tuple is a record:
    None."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, (list, set, frozenset)):
        return None
    items = list(value)
    if items and all(isinstance(i, (tuple, list)) and len(i) == 2 and _hashable(i[0]) for i in items):
        pairs = {i[0]: i[1] for i in items}
        if len(pairs) == len(items):
            return pairs
    if all(_hashable(i) for i in items) and len(set(items)) == len(items):
        return dict.fromkeys(items, _PRESENT)
    return None


def _changes(a: Any, b: Any, path: tuple[Any, ...], out: list[tuple[str, tuple[Any, ...], Any, Any]]) -> None:
    if a == b:
        return
    ma, mb = _as_mapping(a), _as_mapping(b)
    if ma is None or mb is None or len(path) > 8:
        out.append(("~", path, a, b))
        return
    found = len(out)
    for k in ma:
        if k not in mb:
            out.append(("-", (*path, k), ma[k], None))
    for k in mb:
        if k not in ma:
            out.append(("+", (*path, k), None, mb[k]))
    for k in ma:
        if k in mb:
            _changes(ma[k], mb[k], (*path, k), out)
    if len(out) == found:  # the same members in another order
        out.append(("~", path, a, b))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= DIFF_WIDTH else text[: DIFF_WIDTH - 3] + "..."


def _key(path: tuple[Any, ...]) -> str:
    if not path:
        return "observe()"
    return ".".join(k if isinstance(k, str) and k.replace("_", "").replace("-", "").isalnum() else _short(k) for k in path)


def world_diff(before: Any, after: Any, base: Path | None = None, label: str = "before -> after") -> str:
    """What differs between two results of ``observe``, one line a change: ``+ key =
    value`` (added), ``- key = value`` (removed), ``~ key: old -> new`` (changed).
    Dicts, lists of ``(key, value)`` pairs and lists of plain values are compared
    member by member, nested ones as paths (``devices.a.snapshots.2``); at most
    :data:`DIFF_LINES` lines, each value cut at :data:`DIFF_WIDTH` characters.
    ``base``, the world's folder, is written ``{base}``."""
    out: list[tuple[str, tuple[Any, ...], Any, Any]] = []
    _changes(_normal(before, base), _normal(after, base), (), out)
    lines = []
    for sign, path, old, new in out[:DIFF_LINES]:
        if sign == "~":
            lines.append(f"~ {_key(path)}: {_short(old)} -> {_short(new)}")
        else:
            value = new if sign == "+" else old
            lines.append(f"{sign} {_key(path)}" + ("" if value is _PRESENT else f" = {_short(value)}"))
    if len(out) > DIFF_LINES:
        lines.append(f"... and {len(out) - DIFF_LINES} more")
    return f"the world, {label}:" + "".join(f"\n    {line}" for line in lines or ["(no difference)"])


def _seen(world: Any, base: Path) -> str:
    """A world as text, with its folder's path written ``{base}``: worlds made in two
    folders compare equal when they are alike."""
    return repr(world).replace(str(base), "{base}")
