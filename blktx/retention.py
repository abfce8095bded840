"""Sanoid-style retention of group snapshots: which to keep, which to prune.

A pure module (no I/O). A :class:`Policy` counts, per bucket, how many
snapshots to keep:

``last = N``
    keeps the N newest snapshots.
``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly`` ``= N``
    split time into calendar periods (hour, day, ISO week, month, year) in
    local time, or in the ``tz`` given to :func:`select`. The newest snapshot
    within a period is that period's representative, and the representatives
    of the newest N periods *that have a snapshot* are kept. Periods without
    snapshots do not count (like sanoid, or restic's ``--keep-daily``): with
    ``daily = 7`` and a week-long gap, the 7 newest days that have snapshots
    are kept, however old. Periods are ordered by their representatives.

A snapshot can be kept for several reasons; everything :func:`select` does not
return is to be pruned. Snapshots with the same time are ordered by key: the
key that sorts last counts as the newer one, so the result never depends on
input order. A policy that keeps nothing at all is :meth:`Policy.empty`;
callers refuse to prune with it rather than delete every snapshot.

In a spec: ``keep = {last = 3, hourly = 24, daily = 7, weekly = 4, monthly = 6}``
(:func:`parse_policy`); on the command line: ``--keep last=3,daily=7``
(:func:`parse_keep_arg`).
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from blktx.params import did_you_mean

BUCKETS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Policy:
    """How many snapshots each bucket keeps (0: the bucket keeps none)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_count(f.name, getattr(self, f.name))

    def empty(self) -> bool:
        """Whether this policy keeps nothing at all (then refuse to prune)."""
        return not any(self.count(bucket) for bucket in BUCKETS)

    def count(self, bucket: str) -> int:
        """The count of one of :data:`BUCKETS`."""
        if bucket not in BUCKETS:
            raise ValueError(_unknown(bucket))
        value: int = getattr(self, bucket)
        return value


def _check_count(bucket: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"retention count {bucket!r} must be a non-negative integer, got {type(value).__name__} {value!r}")


def _unknown(bucket: str) -> str:
    hint = did_you_mean(bucket, list(BUCKETS)) or f"known buckets: {', '.join(BUCKETS)}"
    return f"unknown retention bucket {bucket!r}: {hint}"


def parse_policy(value: object) -> Policy:
    """A :class:`Policy` from a TOML table like ``{last = 3, daily = 7}``.

    :raises ValueError: not a table, an unknown bucket, or a count that is not
        a non-negative integer (booleans are refused).
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"a retention policy must be a table like {{last = 3, daily = 7}}, got {type(value).__name__} {value!r}")
    counts: dict[str, int] = {}
    for bucket, count in value.items():
        if not isinstance(bucket, str) or bucket not in BUCKETS:
            raise ValueError(_unknown(str(bucket)))
        _check_count(bucket, count)
        counts[bucket] = count
    return Policy(**counts)


_COUNT = re.compile(r"-?[0-9]+")


def parse_keep_arg(text: str) -> Policy:
    """A :class:`Policy` from the command-line form ``last=3,daily=7,weekly=4``.

    :raises ValueError: as :func:`parse_policy`, and for an empty text, an item
        without ``=`` or a bucket given twice.
    """
    if not text.strip():
        raise ValueError("an empty retention policy: give counts like last=3,daily=7")
    counts: dict[str, object] = {}
    for item in text.split(","):
        bucket, sep, count = (part.strip() for part in item.partition("="))
        if not sep or not bucket:
            raise ValueError(f"retention item {item.strip()!r} is not BUCKET=COUNT (like daily=7)")
        if bucket in counts:
            raise ValueError(f"retention bucket {bucket!r} is given twice")
        counts[bucket] = int(count) if _COUNT.fullmatch(count) else count
    return parse_policy(counts)


def describe(policy: Policy) -> str:
    """The policy for messages: ``"last=3, daily=7"``, or ``"nothing"`` when empty."""
    parts = [f"{bucket}={policy.count(bucket)}" for bucket in BUCKETS if policy.count(bucket)]
    return ", ".join(parts) or "nothing"


def _week(when: datetime.datetime) -> str:
    iso = when.isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"


def _stamp(key: str, when: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(when, tz)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"snapshot {key!r} has no usable time {when!r}: {exc}") from None


_PERIODS: dict[str, Callable[[datetime.datetime], str]] = {
    "hourly": lambda when: f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}",
    "daily": lambda when: f"{when.year:04d}-{when.month:02d}-{when.day:02d}",
    "weekly": _week,
    "monthly": lambda when: f"{when.year:04d}-{when.month:02d}",
    "yearly": lambda when: f"{when.year:04d}",
}


def select(snapshots: Sequence[tuple[str, float]], policy: Policy, *, tz: datetime.tzinfo | None = None) -> dict[str, list[str]]:
    """The snapshots ``policy`` keeps, each with its reasons (in :data:`BUCKETS` order).

    :param snapshots: ``(key, unix time)`` pairs, keys unique, in any order.
    :param tz: the time zone of the calendar periods; local time by default.
    :returns: ``{key: reasons}`` for every kept snapshot, reasons like
        ``"last 1/3"``, ``"hourly 2026-11-27T13"``, ``"daily 2026-11-27"``,
        ``"weekly 2026-W48"``, ``"monthly 2026-11"`` and ``"yearly 2026"``.
        Every snapshot not in it is to be pruned.
    :raises ValueError: a key given twice, or a time that is not finite or out of range.
    """
    twice = sorted(key for key, seen in Counter(key for key, _ in snapshots).items() if seen > 1)
    if twice:
        raise ValueError(f"snapshot keys given more than once: {', '.join(twice)}")
    newest_first = sorted(snapshots, key=lambda snap: (snap[1], snap[0]), reverse=True)
    kept: dict[str, list[str]] = {}
    for index, (key, _) in enumerate(newest_first[: policy.last]):
        kept.setdefault(key, []).append(f"last {index + 1}/{policy.last}")
    stamps = [(key, _stamp(key, when, tz)) for key, when in newest_first]
    for bucket, period_of in _PERIODS.items():
        wanted = policy.count(bucket)
        seen: set[tuple[str, Any]] = set()
        for key, stamp in stamps:
            if len(seen) >= wanted:
                break
            period = period_of(stamp)
            # the hour that repeats when clocks go back is two hours: told apart by offset
            token = (period, stamp.utcoffset() if bucket == "hourly" else None)
            if token not in seen:
                seen.add(token)
                kept.setdefault(key, []).append(f"{bucket} {period}")
    return kept
